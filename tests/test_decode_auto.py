"""n_draft="auto" (inference/auto.py): drafting only where it pays, from measured step costs.

Invariants (docs/speculative_decoding.md, "How many drafts"):
  * the rule: with step costs where no acceptance can pay, it decodes plainly from the start;
    where drafting is cheap and drafts are right, it keeps them; in between the width of
    largest gain E_w * c_1 / c_w, with E_w from the measured match rates;
  * end to end, both families: costs where drafting loses -> the run decodes plainly (no
    speculative step at all, or one) and says why; costs where it wins and drafts that match
    -> it drafts; every output equals plain greedy (float64);
  * earlier runs' rates decide where a run starts, and every Decoder.RECHECK-th run drafts
    again to re-measure them;
  * measured costs are positive and never cheaper for a wider block.
"""

from __future__ import annotations

import pytest
import torch
from test_chain_decode import copy_chain, random_chain

from mtp_dist.config import ModelConfig
from mtp_dist.inference import Decoder, DecodeStats
from mtp_dist.inference.auto import AutoDrafts, StepCosts, could_pay, gains, measure_step_costs
from mtp_dist.model import MTPModel

VOCAB = 512
LOSES = StepCosts({1: 1.0, 2: 2.1, 3: 3.2, 4: 4.3})
"""fp32 on a CPU without native bf16 and worse: every block of w costs more than w tokens."""
CHEAP = StepCosts({1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15})
"""A wider block nearly free (bf16 on AMX, a GPU)."""
DEAR = StepCosts({1: 1.0, 2: 1.8, 3: 2.4, 4: 3.0})
"""A block could pay only with drafts right most of the time."""


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_of(n_future: int = 4, seed: int = 3, zero: bool = False) -> MTPModel:
    """A random float64 parallel model (drafts rarely right), or an all-zero one (every logit
    0: every argmax is token 0, so every draft is right)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=1 + n_future,
        n_attn_heads=4,
        n_future=n_future,
        max_seq_len=128,
        init_std=0.2,
    )
    model = MTPModel(cfg).double().eval()
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def prompts_for(vocab: int = VOCAB, lengths=(1, 3, 8, 13, 20)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def stats_with(rates: list[float], blocks: int = 100) -> DecodeStats:
    """Statistics of `blocks` blocks whose drafts matched at cumulative rates r_1.."""
    width = len(rates) + 1
    matched = [blocks] + [round(r * blocks) for r in rates]
    return DecodeStats(width=width, steps=blocks, verified=[blocks] * width, matched=matched)


def test_rule_from_costs_and_rates():
    # No acceptance can pay: plain from the start, and the line says why.
    rule = AutoDrafts(LOSES)
    assert could_pay(LOSES, 4) == 1 and rule.start(4) == 1
    assert rule.reason == "a block of 2 costs 2.10x one token here"  # the nearest to paying
    # Could pay: the run starts at the widest width that could.
    assert AutoDrafts(DEAR).start(4) == 4
    assert AutoDrafts(StepCosts({1: 1.0, 2: 1.5, 3: 3.5, 4: 4.5})).start(4) == 2
    # Drafts right 30% of the time: a loss at these costs -> plain, with the measured reason.
    rule = AutoDrafts(DEAR)
    assert rule.keep(stats_with([0.3, 0.1, 0.02]), 4) == 1
    assert rule.reason.startswith("a block of 2 costs 1.80x one token here and yields 1.3")
    assert rule.reason.endswith(" tokens")
    # ... but a gain where a block is nearly free: the far drafts (rarely right) are dropped.
    assert AutoDrafts(CHEAP).keep(stats_with([0.3, 0.1, 0.02]), 4) == 3
    # Right 90% of the time: every draft pays, even where a block of 4 costs 3 tokens.
    assert AutoDrafts(DEAR).keep(stats_with([0.9, 0.8, 0.7]), 4) == 4
    # The gain itself: E_w * c_1 / c_w.
    g = gains(DEAR, [1.0, 0.9, 0.8, 0.7], 4)
    assert g[1] == 1.0 and g[2] == pytest.approx(1.9 / 1.8) and g[4] == pytest.approx(3.4 / 3)


def test_one_missed_block_ends_drafting_where_it_costs():
    """The rates are posterior means: after one block of batch 1 that missed, r_j = 1/3, so
    at DEAR costs the run stops drafting after one step; after one that matched, r_j = 2/3
    (E_4 = 3 = c_4: a tie, decided for the cheaper plain step); after two, it goes on."""
    missed = DecodeStats(width=4, steps=2, verified=[2, 1, 1, 1], matched=[2, 0, 0, 0])
    assert AutoDrafts(DEAR).keep(missed, 4) == 1
    hit = DecodeStats(width=4, steps=2, verified=[2, 1, 1, 1], matched=[2, 1, 1, 1])
    assert AutoDrafts(DEAR).keep(hit, 4) == 1
    two = DecodeStats(width=4, steps=3, verified=[3, 2, 2, 2], matched=[3, 2, 2, 2])
    assert AutoDrafts(DEAR).keep(two, 4) == 4


@pytest.mark.parametrize("family", ["parallel", "chained"])
def test_auto_decodes_plainly_where_drafting_loses(family):
    model = model_of() if family == "parallel" else random_chain(4, seed=3)
    vocab = model.cfg.vocab_size
    prompts = prompts_for(vocab)
    plain = Decoder(model).run(prompts, max_new_tokens=30)
    for costs, most_blocks in ((LOSES, 0), (DEAR, 1)):  # plain from the start / after a step
        out = Decoder(model, step_costs=costs).run(
            prompts, max_new_tokens=30, speculative=True, n_draft="auto"
        )
        assert out.tokens == plain.tokens
        assert out.stats.drafts_at_end == 0
        assert out.stats.verified[1:] == [len(prompts) * most_blocks] * (out.stats.width - 1)
        assert out.stats.tokens_per_forward == pytest.approx(1.0, abs=0.05)
        assert out.stats.plain_because.startswith("a block of")
        assert out.stats.step_cost == costs.as_dict()


@pytest.mark.parametrize("family", ["parallel", "chained"])
def test_auto_drafts_where_it_wins(family):
    """Drafts that are right (an all-zero model; a noiseless copy chain) and a nearly free
    block: every draft is kept, several tokens per forward, output greedy's."""
    model = model_of(zero=True) if family == "parallel" else copy_chain(4, noise=0.0)
    prompts = prompts_for(model.cfg.vocab_size)
    plain = Decoder(model).run(prompts, max_new_tokens=30)
    for costs in (CHEAP, DEAR):
        out = Decoder(model, step_costs=costs).run(
            prompts, max_new_tokens=30, speculative=True, n_draft="auto"
        )
        assert out.tokens == plain.tokens
        assert out.stats.drafts_at_end == 3
        assert out.stats.tokens_per_forward > 3
        assert out.stats.plain_because == ""


def test_earlier_runs_decide_the_start_and_runs_recheck():
    model = model_of()
    prompts = prompts_for()
    dec = Decoder(model, step_costs=DEAR)
    first = dec.run(prompts, max_new_tokens=30, speculative=True, n_draft="auto")
    assert first.stats.verified[1] == len(prompts)  # one step of drafts, then plain
    runs = [first]
    while len(runs) < Decoder.RECHECK:
        runs.append(dec.run(prompts, max_new_tokens=30, speculative=True, n_draft="auto"))
    # Once earlier runs verified MIN_PRIOR blocks (here: after the first), runs start plainly...
    assert all(r.stats.width == 1 and r.stats.drafts_at_end == 0 for r in runs[1:-1])
    assert all(r.tokens == first.tokens for r in runs)
    # ... and every RECHECK-th drafts again for a step, to re-measure.
    assert runs[-1].stats.verified[1] == len(prompts)


@pytest.mark.parametrize("batch", [1, 3])
def test_measured_costs(batch):
    model = model_of()
    dec = Decoder(model)
    costs = measure_step_costs(dec, prompts_for()[:batch], 4)
    assert sorted(costs.seconds) == [1, 2, 3, 4]
    seconds = [costs.seconds[w] for w in range(1, 5)]
    assert all(0 < s < 1 for s in seconds) and seconds == sorted(seconds)
    # With the measured costs, whatever they decide, the output is greedy's.
    prompts = prompts_for()[:batch]
    out = dec.run(prompts, max_new_tokens=20, speculative=True, n_draft="auto")
    assert out.tokens == dec.run(prompts, max_new_tokens=20).tokens
    assert out.stats.calibration_seconds > 0 and out.stats.step_cost["1"] == 1.0


def test_observed_step_times_correct_the_measured_costs():
    """Steps of this run slower than measured: their median replaces c_w once OBSERVED steps
    were timed (a cheaper observation never lowers it)."""
    costs = StepCosts({1: 1.0, 2: 1.3, 3: 1.6, 4: 2.0})
    stats = stats_with([0.5, 0.1, 0.05])  # E_2 = 1.5: pays at 1.3, loses at 1.6
    rule = AutoDrafts(costs)
    assert rule.keep(stats, 2) == 2
    few = [1.7] * (AutoDrafts.OBSERVED - 1)
    assert rule.keep(stats, 2, few) == 2  # too few timings yet
    assert rule.keep(stats, 2, [*few, 1.0, 1.8]) == 1
    assert "a block of 2 costs 1.70x" in rule.reason
    assert AutoDrafts(costs).keep(stats, 2, [0.5] * 9) == 2
