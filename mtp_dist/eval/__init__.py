"""Code evaluation: HumanEval and MBPP pass@k, with every check run in a sandbox process.

    problems = load_benchmark("mbpp")
    result = evaluate(complete, problems, EvalConfig(samples=0), Sandbox())

Protocol and sandbox: docs/eval.md. Names are imported on first use (see mtp_dist.inference).
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "BENCHMARKS": "benchmarks",
    "Problem": "benchmarks",
    "load_benchmark": "benchmarks",
    "load_humaneval": "benchmarks",
    "load_mbpp": "benchmarks",
    "EvalConfig": "harness",
    "evaluate": "harness",
    "reference_completions": "harness",
    "mean_pass_at_k": "passk",
    "pass_at_k": "passk",
    "CheckResult": "sandbox",
    "Limits": "sandbox",
    "Sandbox": "sandbox",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
