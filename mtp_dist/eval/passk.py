"""The unbiased pass@k estimator of Chen et al. 2021 (the Codex paper, Sec. 2.1).

With n samples of which c are correct, pass@k = E[1 - C(n-c, k) / C(n, k)]; computed as a
product so that large n does not overflow: 1 - prod_{i=n-c+1..n} (1 - k / i).
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn (without replacement) from n samples,
    c of them correct, is correct."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(samples: Sequence[int], correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (samples[i], correct[i] for problem i)."""
    if len(samples) != len(correct) or not samples:
        raise ValueError("need one (samples, correct) pair per problem, at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in zip(samples, correct)) / len(samples)
