"""n_draft="auto": draft only where drafting pays, decided from step costs measured here.

A speculative step of block width w (the pending token + w-1 drafts) costs c_w seconds and
emits on average E_w = 1 + r_1 + .. + r_{w-1} tokens per sequence, where r_j is the fraction
of blocks whose first j drafts all matched head 1 (DecodeStats.matched / verified). Plain
decoding emits 1 token per c_1. Width w pays when its throughput gain

    gain_w = E_w * c_1 / c_w  > 1,

and the best width is the one of largest gain (width 1, plain decoding, has gain 1). Acceptance
alone cannot decide this: on a CPU computing fp32, a block of 2 tokens plus the draft heads
cost about 2x one token (docs/benchmarks.md, "Decoding on this machine"), so even a draft
accepted every time would not pay there, while in bf16 on AMX, or on a GPU, a wider block is
nearly free and drafts accepted a third of the time pay.

The costs c_w are measured, not assumed: `measure_step_costs` times real decoding steps of each
width on the caller's prompts (best of a few, the widths interleaved so that load from other
processes hits them alike) and caches them per model shape, dtype, device, thread count, batch
size and decoding path for the life of the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepCosts:
    """Seconds of one batched decoding step per block width (1 = plain decoding)."""

    seconds: dict[int, float]

    def ratio(self, width: int) -> float:
        """c_w / c_1: what a step of `width` tokens costs in plain steps."""
        return self.seconds[width] / self.seconds[1]

    def as_dict(self) -> dict:
        return {str(w): round(self.ratio(w), 3) for w in sorted(self.seconds)}


def expected_tokens(rates: list[float], width: int) -> float:
    """E_w: tokens a block of `width` emits on average, given cumulative match rates r_1.."""
    return 1.0 + sum(rates[1:width])


def gains(costs: StepCosts, rates: list[float], widest: int) -> dict[int, float]:
    """gain_w = E_w * c_1 / c_w for w = 1..widest (gain_1 = 1)."""
    return {w: expected_tokens(rates, w) / costs.ratio(w) for w in range(1, widest + 1)}


def could_pay(costs: StepCosts, widest: int) -> int:
    """The widest w <= widest at which drafts accepted every time would pay (c_w < w * c_1),
    or 1 if none would: then no acceptance rate can make drafting pay."""
    return max((w for w in range(2, widest + 1) if costs.ratio(w) < w), default=1)


@dataclass
class AutoDrafts:
    """The rule of n_draft="auto" for one decoding run.

    Start (`start`): at the widest width that could pay with every draft accepted (plain
    decoding if none could), or, where earlier runs of this decoder measured the match rates,
    at the best width they give. While drafting (`keep`, after every speculative step): the
    width of largest gain with the rates measured so far (this run's blocks and
    earlier runs'), never wider than the current one (a dropped draft head's cache is not kept
    up to date); width 1 ends drafting for the rest of the run. Output is greedy whatever is
    decided: a narrower block only yields fewer tokens per forward."""

    costs: StepCosts
    prior: tuple[list[int], list[int]] | None = None
    """(matched, verified) per block position from earlier runs of this decoder (None: too
    few yet to go by)."""
    explore: bool = False
    """Start at the widest width that could pay even where the prior says plain (a periodic
    re-check: the prior is only updated by runs that draft)."""
    reason: str = field(default="", init=False)
    """Why the run decodes plainly, in a few words ('' while it drafts)."""

    def start(self, widest: int) -> int:
        reach = could_pay(self.costs, widest)
        if reach == 1:
            self.reason = self._why_not(widest)
            return 1
        if self.prior is None or self.explore:
            return reach
        return self._best(self.rates(None, reach), reach)

    def rates(self, stats, width: int) -> list[float]:
        """r_0..r_{width-1}: this run's blocks (`stats`, or none) and the prior's together,
        each the mean of its posterior under a uniform prior ((matched + 1) / (verified + 2)):
        after one block of batch 1 that missed, r_j = 1/3, so a run stops drafting after one
        step where drafts are rarely right and drafting costs (losing at most that step), and
        a draft never seen verified counts as 1/2."""
        matched, verified = [0] * width, [0] * width
        for source in (self.prior, stats and (stats.matched, stats.verified)):
            if source:
                for j in range(width):
                    matched[j] += source[0][j] if j < len(source[0]) else 0
                    verified[j] += source[1][j] if j < len(source[1]) else 0
        return [1.0] + [(m + 1) / (v + 2) for m, v in zip(matched[1:], verified[1:])]

    def keep(self, stats, width: int, seen: list[float] | None = None) -> int:
        """Block width to use from now on (1: decode plainly). `seen`: this run's timings of
        its steps at `width` so far. From OBSERVED of them on, their median replaces c_width
        where it is dearer: a real step does more than the measured one where drafts are
        accepted (the draft heads over more positions, more columns verified; bf16 steps of
        the default model here: median 3.7 ms against 3.0 ms measured), and a rule priced
        too low would keep drafting at a loss."""
        costs = self.costs
        if seen is not None and len(seen) >= self.OBSERVED:
            median = sorted(seen)[len(seen) // 2]
            if median > costs.seconds[width]:
                costs = StepCosts({**costs.seconds, width: median})
        return self._best(self.rates(stats, width), width, costs)

    OBSERVED = 4
    """Steps of the current width after which their median time counts (`keep`)."""

    def _best(self, rates: list[float], widest: int, costs: StepCosts | None = None) -> int:
        costs = costs or self.costs
        g = gains(costs, rates, widest)
        best = max(g, key=lambda w: (g[w], -w))  # ties: the narrower (cheaper) width
        if best == 1:
            self.reason = (
                f"a block of 2 costs {costs.ratio(2):.2f}x one token here and yields "
                f"{expected_tokens(rates, 2):.2f} tokens"
            )
        return best

    def _why_not(self, widest: int) -> str:
        w = min(range(2, widest + 1), key=lambda w: self.costs.ratio(w) / w)
        return f"a block of {w} costs {self.costs.ratio(w):.2f}x one token here"


_COSTS: dict[tuple, StepCosts] = {}
"""Measured step costs of this process, per `cost_key`."""


def cost_key(dec, batch: int) -> tuple:
    """What a step's cost depends on: model shape, dtype, device, threads, batch, path."""
    cfg = dec.model.cfg
    shape = (cfg.d_model, cfg.n_layers, cfg.n_future, cfg.vocab_size, cfg.kv_heads)
    shape += (cfg.n_attn_heads, cfg.ffn_hidden, cfg.mtp_arch)
    param = dec.embedding
    where = (param.dtype, param.device.type, torch.get_num_threads())
    return (*shape, *where, batch, dec.fused, dec.compiled)


def measure_step_costs(
    dec,
    prompts: list[list[int]],
    widest: int,
    repeats: tuple[int, int] = (3, 12),
    seconds: float = 0.25,
) -> StepCosts:
    """Seconds of a decoding step of each width 1..widest on these prompts: the best of at
    least repeats[0] and at most repeats[1] timings (more while under `seconds` in all),
    widths interleaved, one untimed step each first. A step of a small model takes about a
    millisecond, shorter than the slices a loaded machine gives a process, so many of its
    timings hold a wait: the best of many is its cost. Steps run on throwaway decoding states
    (the caller's run is untouched)."""
    from .decode import _Run

    half = dec.max_len // 2  # prompts cut to half the context: room for the steps taken here
    prompts = [list(p)[-half:] for p in prompts]
    budget = min(dec.max_len - half, (repeats[1] + 1) * widest)
    runs, steps = {}, {}
    for w in range(1, widest + 1):
        run = _Run(dec, prompts, budget, w - 1, None)
        run.prefill(_argmax)
        runs[w] = run
        steps[w] = run.speculative_step if w > 1 else lambda run=run: run.plain_step(_argmax)
    best = dict.fromkeys(runs, float("inf"))
    start = time.perf_counter()
    for rep in range(repeats[1] + 1):
        if rep > repeats[0] and time.perf_counter() - start > seconds:
            break
        if not all(run.active for run in runs.values()):  # a row reached its budget
            break
        for w in runs:
            t = time.perf_counter()
            steps[w]()
            if rep:
                best[w] = min(best[w], time.perf_counter() - t)
    # A wider step does all a narrower one does and more, so c_w <= c_{w+1}: a width measured
    # dearer than a wider one met load from other processes and takes the wider one's cost.
    for w in range(widest - 1, 0, -1):
        best[w] = min(best[w], best[w + 1])
    return StepCosts(best)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def step_costs(
    dec, prompts: list[list[int]], widest: int, measure: Callable | None = None
) -> StepCosts:
    """The process's costs for this decoder and batch size, measured on first use (by
    `measure`, default `measure_step_costs`)."""
    key = cost_key(dec, len(prompts))
    got = _COSTS.get(key)
    if got is None or max(got.seconds) < widest:
        got = _COSTS[key] = (measure or measure_step_costs)(dec, prompts, widest)
    return got
