"""KV-cached and self-speculative decoding on random float64 models: exact against references.

Invariants (docs/speculative_decoding.md):
  * plain cached greedy == argmax of the uncached model, prompt by prompt;
  * speculative greedy == plain greedy, token for token, for n = 2, 4, 8 and any draft count;
  * a batch of prompts of different lengths == each prompt decoded alone (plain and speculative);
  * budgets (max tokens, context end) and stop rules cut both modes at the same token.
float64 makes argmax ties and roundoff between differently shaped matmuls irrelevant.
"""

from __future__ import annotations

import pytest
import torch

from mtp_dist.config import ModelConfig
from mtp_dist.inference import Decoder, DecodeStats, Stopper
from mtp_dist.inference.auto import StepCosts
from mtp_dist.inference.fused import rotary_table
from mtp_dist.inference.heads import DraftHeads
from mtp_dist.inference.kv_cache import CacheState, ModelCache
from mtp_dist.inference.sampling import sample
from mtp_dist.model import MTPModel

BYTE_VOCAB, SP_VOCAB = 320, 512  # 259 bytes+specials padded to 64; a sentencepiece-sized one


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: OpenMP threads only add contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(
    n_future: int, vocab: int, seed: int = 0, max_seq_len: int = 96, n_kv_heads: int = 0
) -> MTPModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_kv_heads=n_kv_heads,
        vocab_size=vocab,
        d_model=32,
        n_layers=1 + n_future,
        n_attn_heads=4,
        n_future=n_future,
        max_seq_len=max_seq_len,
        init_std=0.2,  # peakier logits than 0.02: greedy paths that are not all one token
    )
    return MTPModel(cfg).double().eval()


def prompts_for(vocab: int, lengths=(1, 3, 8, 13, 20), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model: MTPModel, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model.next_token_logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("vocab", [BYTE_VOCAB, SP_VOCAB])
def test_cached_greedy_matches_uncached_model(vocab, fused):
    """Both decoding paths (fused layers, the default; the model's own modules) are the model."""
    model = random_model(2, vocab)
    prompts = prompts_for(vocab)
    out = Decoder(model, fused=fused).run(prompts, max_new_tokens=16)
    assert out.tokens == [reference_greedy(model, p, 16) for p in prompts]
    assert out.finish_reasons == ["length"] * len(prompts)
    assert out.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("vocab", [BYTE_VOCAB, SP_VOCAB])
@pytest.mark.parametrize("n_future", [2, 4, 8])
def test_speculative_equals_greedy_batched_and_alone(n_future, vocab):
    model = random_model(n_future, vocab, seed=n_future)
    dec = Decoder(model)
    prompts = prompts_for(vocab, seed=n_future)
    plain = dec.run(prompts, max_new_tokens=24)
    spec = dec.run(prompts, max_new_tokens=24, speculative=True)
    assert spec.tokens == plain.tokens
    for p, expected in list(zip(prompts, plain.tokens))[1:4]:
        assert dec.run([p], max_new_tokens=24).tokens == [expected]
        assert dec.run([p], max_new_tokens=24, speculative=True).tokens == [expected]
    assert spec.stats.width == n_future
    assert spec.stats.forwards <= plain.stats.forwards


def test_every_draft_count_gives_greedy():
    model = random_model(8, SP_VOCAB, seed=3)
    dec = Decoder(model)
    prompts = prompts_for(SP_VOCAB, seed=3)
    plain = dec.run(prompts, max_new_tokens=20).tokens
    for n_draft in range(0, 8):
        out = dec.run(prompts, max_new_tokens=20, speculative=True, n_draft=n_draft)
        assert out.tokens == plain, n_draft
    with pytest.raises(ValueError):
        dec.run(prompts, max_new_tokens=4, speculative=True, n_draft=8)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_query_attention_decodes_exactly(n_kv_heads):
    """A GQA model (4 query heads sharing 2 or 1 key/value heads): the caches hold only the
    key/value heads; cached greedy == the uncached model, speculative (all drafts and auto,
    batched and alone) == greedy, and the fused layers == the modules."""
    model = random_model(4, SP_VOCAB, seed=5, n_kv_heads=n_kv_heads)
    prompts = prompts_for(SP_VOCAB)
    dec = Decoder(model)
    plain = dec.run(prompts, max_new_tokens=12)
    for p, got in zip(prompts, plain.tokens):
        assert got == reference_greedy(model, p, 12)
    assert Decoder(model, fused=False).run(prompts, max_new_tokens=12).tokens == plain.tokens
    for n_draft in (None, "auto", 1):
        spec = dec.run(prompts, max_new_tokens=12, speculative=True, n_draft=n_draft)
        assert spec.tokens == plain.tokens, n_draft
    alone = dec.run(prompts[3:4], max_new_tokens=12, speculative=True)
    assert alone.tokens == plain.tokens[3:4]
    cache = ModelCache(1, 0, torch.zeros(1, dtype=torch.long), capacity=8)
    from mtp_dist.inference.fused import FusedBlock

    x = torch.randn(1, 3, model.cfg.d_model, dtype=torch.float64)
    FusedBlock(model.trunk[0])(
        x, rotary_table(model)[torch.arange(3)][None, :, None], cache.trunk[0]
    )
    assert cache.trunk[0].k.shape == (1, n_kv_heads, 8, model.cfg.d_model // 4)


def test_auto_draft_count_drops_rare_drafts_and_stays_greedy():
    """n_draft="auto" where one draft is free and more cost: drafts a random model rarely gets
    right are dropped mid-run (their heads' weights and caches narrowed), the first is kept,
    and every output is still plain greedy's (tests/test_decode_auto.py: the rule itself)."""
    model = random_model(4, SP_VOCAB, seed=3)
    prompts = prompts_for(SP_VOCAB)
    costs = StepCosts({1: 1.0, 2: 1.0, 3: 1.6, 4: 2.2})
    plain = Decoder(model).run(prompts, max_new_tokens=40)
    for batch in (prompts, prompts[2:3]):
        dec = Decoder(model, step_costs=costs)  # no earlier runs: it starts with every draft
        auto = dec.run(batch, max_new_tokens=40, speculative=True, n_draft="auto")
        assert auto.tokens == [plain.tokens[prompts.index(p)] for p in batch]
        assert auto.stats.drafts_at_end == 1 < auto.stats.width - 1
    assert plain.stats.drafts_at_end is None


def test_all_drafts_accepted_path():
    """An all-zero model: every logit is exactly 0, so every head's argmax is token 0 and every
    draft is accepted — the batch advances n tokens per forward until the budget cuts it."""
    model = random_model(4, SP_VOCAB, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    dec = Decoder(model)
    prompts = prompts_for(SP_VOCAB, seed=5)
    spec = dec.run(prompts, max_new_tokens=21, speculative=True)
    assert spec.tokens == dec.run(prompts, max_new_tokens=21).tokens == [[0] * 21] * 5
    assert spec.stats.acceptance_rate == [1.0, 1.0, 1.0, 1.0]
    assert spec.stats.forwards == 5 * 6  # prefill (1 token) + 5 blocks of 4 tokens = 21


def test_context_end_and_budget_identical():
    model = random_model(4, SP_VOCAB, seed=6, max_seq_len=40)
    dec = Decoder(model)
    prompts = prompts_for(SP_VOCAB, lengths=(39, 36, 30, 5, 40), seed=6)
    plain = dec.run(prompts, max_new_tokens=50)
    spec = dec.run(prompts, max_new_tokens=50, speculative=True)
    assert spec.tokens == plain.tokens
    assert [len(t) for t in plain.tokens] == [1, 4, 10, 35, 0]  # the context holds 40 tokens
    assert plain.finish_reasons == ["length"] * 5
    with pytest.raises(ValueError):
        dec.run([[1] * 41], max_new_tokens=1)


def test_empty_batch_and_empty_prompt_are_told_apart():
    dec = Decoder(random_model(2, SP_VOCAB))
    for speculative in (False, True):
        with pytest.raises(ValueError, match="batch is empty"):
            dec.run([], max_new_tokens=1, speculative=speculative)
        with pytest.raises(ValueError, match="every prompt needs at least one token"):
            dec.run([[1, 2], []], max_new_tokens=1, speculative=speculative)


def test_eos_and_stop_cut_both_modes_at_the_same_token():
    model = random_model(4, BYTE_VOCAB, seed=7)
    dec = Decoder(model)
    prompts = prompts_for(BYTE_VOCAB, seed=7)
    free = dec.run(prompts, max_new_tokens=30).tokens
    eos = free[2][5]  # a token the third prompt produces: it must end there
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)
    stop_text = decode(free[4][10:12])

    def stoppers():
        return [Stopper(eos_id=eos, stop=(stop_text,), decode=decode) for _ in prompts]

    results = []
    for speculative in (False, True):
        stops = stoppers()
        out = dec.run(prompts, max_new_tokens=30, speculative=speculative, stoppers=stops)
        results.append(
            (out.tokens, out.finish_reasons, [s.text(t) for s, t in zip(stops, out.tokens)])
        )
    assert results[0] == results[1]
    tokens, reasons, texts = results[0]
    assert reasons[2] == "eos" and tokens[2] == free[2][: free[2].index(eos)]
    assert reasons[4] in ("stop", "eos") and stop_text not in texts[4]
    for toks, reason, full in zip(tokens, reasons, free):
        assert toks == full[: len(toks)]  # a prefix of the free-running greedy output
        assert reason != "length" or len(toks) == 30


def test_draft_heads_match_model_heads():
    """The fused draft path computes what the model's heads 2..n compute (so acceptance rates
    are the model's): incrementally, in chunks, read at a different position per sequence, with
    rows keeping different numbers of positions (the speculative rollback)."""
    model = random_model(4, SP_VOCAB, seed=8)
    ids = torch.randint(0, SP_VOCAB, (2, 14))
    rows = torch.arange(2)
    with torch.no_grad():
        h, cos, sin = model.trunk_forward(ids)
        ref = torch.stack([model.heads.head_hidden(i, h, cos, sin) for i in (1, 2, 3)], dim=2)
        drafts = DraftHeads(model, 1, 3)
        cache = ModelCache(0, 2, torch.zeros(2, dtype=torch.long), capacity=32)
        kept = torch.zeros(2, dtype=torch.long)
        for size, last in ((5, (4, 2)), (6, (5, 0)), (3, (2, 2))):
            last = torch.tensor(last)
            pos = kept[:, None] + torch.arange(size)  # (2, size) absolute positions per row
            freqs = rotary_table(model)[pos][:, :, None]
            out = drafts(h[rows[:, None], pos], freqs, last, cache.heads[1])  # (2, 3, d)
            torch.testing.assert_close(out, ref[rows, kept + last], rtol=0, atol=1e-12)
            cache.commit(last + 1)
            kept += last + 1


def test_cache_state_masks_and_rollback():
    state = CacheState(torch.tensor([2, 0]), capacity=8)
    write, mask, used = state.slots(3, torch.float32)
    assert write.tolist() == [[2, 3, 4], [0, 1, 2]] and used == 5
    seen = (mask == 0).int()  # additive mask: 0 where attended, -inf elsewhere
    assert mask.dtype == torch.float32 and bool(torch.isinf(mask[mask != 0]).all())
    assert seen[0, 0].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert seen[1, 0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    state.commit(torch.tensor([1, 3]))  # row 0 keeps one of three (rollback), row 1 all
    assert state.lengths.tolist() == [3, 3]
    with pytest.raises(RuntimeError, match="KV cache full"):
        state.slots(6, torch.float32)


def test_sampling_rules():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
    assert sample(logits, 0.0).unique().tolist() == [1]
    assert sample(logits, 1.0, top_p=0.01, generator=gen).unique().tolist() == [1]
    draws = sample(logits, 1.0, generator=gen)
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), atol=0.03, rtol=0)
    nucleus = sample(logits, 1.0, top_p=0.8, generator=gen)  # p = .66 .24 .09 .03
    assert set(nucleus.unique().tolist()) == {1, 2}
    hot = sample(logits, 100.0, generator=gen)
    assert torch.bincount(hot, minlength=4).min() > 800  # near uniform at high temperature


def test_sampled_decoding_is_seeded_and_greedy_refuses_temperature():
    model = random_model(2, SP_VOCAB, seed=9)
    dec = Decoder(model)
    prompts = prompts_for(SP_VOCAB, seed=9)
    run = lambda seed: (
        dec.run(
            prompts,
            max_new_tokens=12,
            temperature=1.0,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
        ).tokens
    )
    assert run(1) == run(1) and run(1) != run(2)
    with pytest.raises(ValueError, match="greedy"):
        dec.run(prompts, max_new_tokens=4, speculative=True, temperature=0.5)


def test_stats_merge_and_dict():
    a = DecodeStats(
        width=2,
        sequences=1,
        tokens=6,
        forwards=3,
        steps=3,
        proposed=[3, 2],
        accepted=[3, 1],
        seconds=1.0,
    )
    b = DecodeStats(width=1, sequences=1, tokens=2, forwards=2, steps=2, seconds=1.0)
    m = a.merge(b)
    assert (m.tokens, m.forwards, m.proposed, m.accepted) == (8, 5, [3, 2], [3, 1])
    assert m.acceptance_rate == [1.0, 0.5] and m.as_dict()["tokens_per_forward"] == 1.6


def test_fused_block_is_the_block():
    """FusedBlock computes what Block computes, with a cache (two forwards: 4 then 3 tokens), in
    float64 to roundoff, though its q/k columns are pair-ordered and rotated as complex numbers."""
    from mtp_dist.inference.fused import FusedBlock

    model = random_model(2, BYTE_VOCAB)
    block = model.trunk[0]
    x = torch.randn(3, 7, model.cfg.d_model, dtype=torch.float64)
    positions = torch.arange(7).expand(3, 7)
    cos, sin = model.rotary(positions)
    freqs = rotary_table(model)[positions][:, :, None]
    outs = []
    for fused in (False, True):
        run = FusedBlock(block) if fused else block
        cache = ModelCache(1, 0, torch.zeros(3, dtype=torch.long), capacity=16)
        parts = []
        for lo, hi in ((0, 4), (4, 7)):
            rot = (freqs[:, lo:hi],) if fused else (cos[:, lo:hi], sin[:, lo:hi])
            parts.append(run(x[:, lo:hi], *rot, cache.trunk[0]))
            cache.commit(hi - lo)
        outs.append(torch.cat(parts, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
