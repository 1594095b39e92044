"""The evaluation loop: complete every problem, check every completion in the sandbox, score.

pass@1 comes from one greedy completion per problem; pass@k for k > 1 from `samples` completions
sampled at `temperature` (top-p `top_p`), scored with the unbiased estimator — the protocol of
Chen et al. 2021 that the MTP paper follows. Checks run in sandbox processes on worker threads
while the model generates the next chunk, so the two overlap.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from ..inference import GenerationConfig
from .benchmarks import Problem
from .passk import mean_pass_at_k
from .sandbox import CheckResult, Sandbox

# (prompts, config) -> completion texts; a Generator's bound method in practice.
Complete = Callable[[Sequence[str], GenerationConfig], list[str]]


@dataclass(kw_only=True)
class EvalConfig:
    ks: tuple[int, ...] = (1, 10, 100)
    """pass@k values to report; k > 1 needs samples >= k."""
    samples: int = 200
    """Sampled completions per problem for k > 1 (0: greedy pass@1 only)."""
    temperature: float = 0.8
    """Sampling temperature for the k > 1 samples."""
    top_p: float = 0.95
    """Nucleus mass for the k > 1 samples."""
    max_tokens: int = 256
    """Most tokens per completion."""
    speculative: bool = False
    """Greedy completions by self-speculative decoding (identical text, fewer forwards)."""
    batch_size: int = 16
    """Prompts decoded together."""
    chunk: int = 32
    """Problems generated before their checks are handed to the sandbox workers."""
    workers: int = 2
    """Checks run at the same time."""
    seed: int = 0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(
    complete: Complete, problems: Sequence[Problem], cfg: EvalConfig, sandbox: Sandbox
) -> dict:
    """Score one benchmark. Returns {'metrics': {...}, 'problems': [per-problem records]}."""
    start = time.perf_counter()
    sampled_ks = [k for k in cfg.ks if k > 1 and cfg.samples >= k]
    skipped = [k for k in cfg.ks if k > 1 and cfg.samples < k]
    greedy_cfg = GenerationConfig(
        max_tokens=cfg.max_tokens, speculative=cfg.speculative, batch_size=cfg.batch_size
    )
    records: list[dict] = []
    futures: list[tuple[Future[CheckResult], list[Future[CheckResult]]]] = []
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for lo in range(0, len(problems), cfg.chunk):
            chunk = problems[lo : lo + cfg.chunk]
            greedy = complete([p.prompt for p in chunk], _with_stop(greedy_cfg, chunk))
            sampled: list[list[str]] = [[] for _ in chunk]
            if sampled_ks:
                sample_cfg = GenerationConfig(
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed + lo,
                )
                texts = complete(
                    [p.prompt for p in chunk for _ in range(cfg.samples)],
                    _with_stop(sample_cfg, chunk),
                )
                sampled = [
                    texts[i * cfg.samples : (i + 1) * cfg.samples] for i in range(len(chunk))
                ]
            for p, g, s in zip(chunk, greedy, sampled):
                records.append({"task_id": p.task_id, "greedy_completion": g})
                futures.append(
                    (
                        pool.submit(sandbox.run, p.program(g)),
                        [pool.submit(sandbox.run, p.program(t)) for t in s],
                    )
                )
            _progress(f"[{chunk[0].benchmark}] generated {len(records)}/{len(problems)}")
        for record, (g_future, s_futures) in zip(records, futures):
            g_result = g_future.result()
            record["greedy_passed"] = g_result.passed
            record["greedy_status"] = g_result.status
            if s_futures:
                record["samples"] = len(s_futures)
                record["samples_correct"] = sum(f.result().passed for f in s_futures)
    metrics: dict[str, float | int | None] = {
        "problems": len(records),
        "pass@1": sum(r["greedy_passed"] for r in records) / max(len(records), 1),
    }
    if sampled_ks:
        n = [r["samples"] for r in records]
        c = [r["samples_correct"] for r in records]
        metrics["pass@1_sampled"] = mean_pass_at_k(n, c, 1)
        for k in sampled_ks:
            metrics[f"pass@{k}"] = mean_pass_at_k(n, c, k)
    for k in skipped:
        metrics[f"pass@{k}"] = None  # not estimable with fewer than k samples
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return {"metrics": metrics, "problems": records}


def _with_stop(cfg: GenerationConfig, chunk: Sequence[Problem]) -> GenerationConfig:
    stops = {s for p in chunk for s in p.stop}  # one benchmark per call: the same stops
    return GenerationConfig(**{**asdict(cfg), "stop": tuple(sorted(stops))})


def reference_completions(problems: Sequence[Problem]) -> Complete:
    """A `Complete` that answers each prompt with its problem's reference solution."""
    by_prompt = {p.prompt: p.reference for p in problems}
    return lambda prompts, cfg: [by_prompt[p] for p in prompts]
