"""Code evaluation: HumanEval and MBPP pass@k, with every check run in a sandbox process.

    problems = load_benchmark("mbpp")
    result = evaluate(complete, problems, EvalConfig(samples=0), Sandbox())

Protocol and sandbox: docs/eval.md.
"""

from .benchmarks import BENCHMARKS, Problem, load_benchmark, load_humaneval, load_mbpp
from .harness import EvalConfig, evaluate, reference_completions
from .passk import mean_pass_at_k, pass_at_k
from .sandbox import CheckResult, Limits, Sandbox

__all__ = [
    "BENCHMARKS",
    "CheckResult",
    "EvalConfig",
    "Limits",
    "Problem",
    "Sandbox",
    "evaluate",
    "load_benchmark",
    "load_humaneval",
    "load_mbpp",
    "mean_pass_at_k",
    "pass_at_k",
    "reference_completions",
]
