"""Decoding chained models (`model.mtp_arch=chained`): exact against references, in float64.

Invariants (docs/speculative_decoding.md, "Chained models"):
  * plain cached greedy == argmax of the uncached main model (`next_token_logits`);
  * speculative greedy == plain greedy, token for token: batched and alone, prompts of different
    lengths, every draft count and auto, budgets, context end, EOS and stop strings;
  * each module's draft hidden state == `ChainedHeads.depth_hidden` of the uncached chain over
    the known tokens + the drafts before it, and module k keeps positions 0..N-k;
  * the per-position counters (`accepted_drafts_per_position`) count what was accepted.
Models: random (drafts almost never accepted), "copy" models whose modules are built to predict
what the main model will (drafts mostly accepted: long blocks, full windows), and a chain
trained for a few seconds (partial and mixed acceptance).
"""

from __future__ import annotations

import json

import pytest
import torch
from toy_models import letter_runs, save_checkpoint

from mtp_dist import checkpoint as ckpt
from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.inference import Decoder, GenerationConfig, Generator, Stopper
from mtp_dist.inference.auto import StepCosts
from mtp_dist.inference.decode import _Run
from mtp_dist.inference.sampling import sample
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer

VOCAB = 48


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: OpenMP threads only add contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chain_config(n_future: int, vocab: int = VOCAB, **kw) -> ModelConfig:
    defaults = dict(d_model=32, n_attn_heads=4, max_seq_len=96, init_std=0.2)
    return ModelConfig(
        **{**defaults, **kw},
        vocab_size=vocab,
        n_layers=1 + n_future,
        n_future=n_future,
        mtp_arch="chained",
    )


def random_chain(n_future: int, seed: int = 0, **kw) -> MTPModel:
    torch.manual_seed(seed)
    return MTPModel(chain_config(n_future, **kw)).double().eval()


def copy_chain(n_future: int, noise: float, seed: int = 0, max_seq_len: int = 96) -> MTPModel:
    """A chain that mostly predicts x_{t+1} = x_t + 1 (mod V) at every depth: one-hot
    embeddings, U the shifted identity, each module's eh_proj passing its token embedding on;
    every layer's weights are random N(0, noise), so attention and the caches count, and with
    noise 0.08 a fair share of the drafts is wrong."""
    torch.manual_seed(seed)
    cfg = chain_config(n_future, d_model=VOCAB, init_std=noise, max_seq_len=max_seq_len)
    model = MTPModel(cfg).double().eval()
    eye = torch.eye(VOCAB, dtype=torch.float64)
    with torch.no_grad():
        model.embed.weight.copy_(eye)
        model.heads.unembed__proj__weight.copy_(eye.roll(1, dims=0))
        for k in range(1, n_future):
            getattr(model.heads, f"head{k}__eh_proj__weight")[:, :VOCAB] += eye
    return model


def prompts_for(lengths=(1, 2, 5, 9, 14), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model: MTPModel, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model.next_token_logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def uncached_chain(model: MTPModel, tokens: list[int], last: int, depth: int):
    """h^1..h^depth at position `last` of the uncached chain over `tokens` (the inputs are
    tokens[:last+1]; module k reads tokens[t+k])."""
    ids = torch.tensor([tokens[: last + 1]])
    with torch.no_grad():
        h, cos, sin = model.trunk_forward(ids)
        ahead = model.embed_ahead(torch.tensor([tokens[1:]]), torch.arange(last + 1))
        hk = model.heads.depth_hidden(0, h, None, cos, sin)
        out = []
        for k in range(1, depth + 1):
            hk = model.heads.depth_hidden(k, hk, ahead[k - 1], cos, sin)
            out.append(hk[0, last])
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_chain_cached_greedy_matches_uncached_model(fused):
    model = random_chain(3)
    prompts = prompts_for()
    out = Decoder(model, fused=fused).run(prompts, max_new_tokens=16)
    assert out.tokens == [reference_greedy(model, p, 16) for p in prompts]
    assert out.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("n_future", [2, 3, 4])
def test_chain_speculative_equals_greedy_every_draft_count(n_future):
    """Random chains: any number of modules 0..n-1 and auto give greedy, batched and alone,
    through the fused layers and the model's own modules."""
    model = random_chain(n_future, seed=n_future)
    prompts = prompts_for(seed=n_future)
    plain = Decoder(model).run(prompts, max_new_tokens=20).tokens
    for fused in (True, False):
        dec = Decoder(model, fused=fused)
        for n_draft in [*range(n_future), None, "auto"]:
            out = dec.run(prompts, max_new_tokens=20, speculative=True, n_draft=n_draft)
            assert out.tokens == plain, (fused, n_draft)
    dec = Decoder(model)
    for p, expected in zip(prompts, plain):
        assert dec.run([p], max_new_tokens=20, speculative=True).tokens == [expected]
    with pytest.raises(ValueError):
        dec.run(prompts, max_new_tokens=4, speculative=True, n_draft=n_future)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["random", "copy"])
def test_module_drafts_equal_the_uncached_chain(kind, fused):
    """Step by step through a batch (prompts of 1..14 tokens; rows accepting different counts):
    every module's output where its draft is read equals depth_hidden of the uncached chain over
    the known tokens + the drafts before it, and module k's cache keeps positions 0..N-k."""
    n = 4
    model = random_chain(n, seed=2) if kind == "random" else copy_chain(n, noise=0.08)
    dec = Decoder(model, fused=fused)
    checked = 0
    with torch.inference_mode():
        run = _Run(dec, prompts_for(), 40, n - 1, None)
        run.prefill(lambda logits: sample(logits, 0.0))
        while run.active and checked < 60:
            for row, i in enumerate(run.active):
                known = run.prompts[i] + run.out[i]  # the last one is the pending token
                last = len(known) - 2  # N - 1: where the drafts are read
                ref = uncached_chain(model, known + run.drafts[row].tolist(), last, n - 1)
                for k in range(1, n):
                    got = run.chain.last_hidden[k - 1][row]
                    torch.testing.assert_close(got, ref[k - 1], rtol=0, atol=1e-12)
                    kept = run.chain.states[k - 1].lengths[row]
                    assert kept == max(0, last + 2 - k), (k, kept)
                checked += 1
            run.speculative_step()
    assert checked >= 20


@pytest.mark.parametrize("noise", [0.05, 0.08])
def test_mostly_accepted_drafts_give_greedy(noise):
    """Copy chains: at noise 0.05 nearly every draft is accepted (windows of n-1 + k positions
    per module, every step); at 0.08 rows of a batch accept different counts."""
    model = copy_chain(4, noise)
    dec = Decoder(model)
    prompts = prompts_for()
    plain = dec.run(prompts, max_new_tokens=30)
    for n_draft in (None, "auto", 2):
        spec = dec.run(prompts, max_new_tokens=30, speculative=True, n_draft=n_draft)
        assert spec.tokens == plain.tokens, n_draft
    for p, expected in zip(prompts, plain.tokens):
        assert dec.run([p], max_new_tokens=30, speculative=True).tokens == [expected]
    stats = dec.run(prompts, max_new_tokens=30, speculative=True).stats
    assert stats.drafts_at_end == 3
    if noise == 0.05:
        assert min(stats.acceptance_rate) > 0.9, stats.as_dict()
        assert stats.tokens_per_forward > 3.0
    else:
        assert 0.2 < min(stats.acceptance_rate[1:]) < max(stats.acceptance_rate[1:]) < 0.9
        assert stats.mixed_steps > 0
    assert Decoder(model, fused=False).run(prompts, max_new_tokens=30).tokens == plain.tokens


def test_accepted_drafts_per_position_are_counted():
    """An all-zero chain: every logit is 0, every argmax token 0, every draft accepted. 5 prompts,
    19 tokens: the prefill, 4 blocks of 4 and a last block of which 2 tokens fit the budget."""
    model = random_chain(4, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    dec = Decoder(model)
    prompts = prompts_for()
    spec = dec.run(prompts, max_new_tokens=19, speculative=True)
    assert spec.tokens == dec.run(prompts, max_new_tokens=19).tokens == [[0] * 19] * 5
    stats = spec.stats
    assert stats.forwards == 5 * 6 and stats.tokens_per_forward == 19 / 6
    assert stats.verified == [30, 25, 25, 25]  # drafts checked per position
    assert stats.accepted_drafts_per_position == [25, 25, 25]  # all matched ...
    assert stats.accepted == [30, 25, 20, 20]  # ... the budget took 2 tokens of the last block
    report = stats.as_dict()
    assert report["accepted_drafts_per_position"] == [25, 25, 25]
    assert report["verified_drafts_per_position"] == [25, 25, 25]
    assert stats.merge(stats).accepted_drafts_per_position == [50, 50, 50]


def test_auto_drops_rarely_accepted_modules():
    """One module free, more costly: the rarely right later modules are dropped, the first
    kept (tests/test_decode_auto.py: the rule and the fall-back to plain decoding)."""
    model = random_chain(4, seed=3)
    prompts = prompts_for()
    costs = StepCosts({1: 1.0, 2: 1.0, 3: 1.6, 4: 2.2})
    plain = Decoder(model).run(prompts, max_new_tokens=40)
    for batch in (prompts, prompts[2:3]):
        dec = Decoder(model, step_costs=costs)  # no earlier runs: it starts with every draft
        auto = dec.run(batch, max_new_tokens=40, speculative=True, n_draft="auto")
        assert auto.tokens == [plain.tokens[prompts.index(p)] for p in batch]
        assert auto.stats.drafts_at_end == 1 < auto.stats.width - 1


def test_context_end_and_budget_identical():
    """Prompts that (nearly) fill the context: the modules' windows run past it (clamped
    positions, never kept) and both modes stop at the same token."""
    model = copy_chain(4, noise=0.05, max_seq_len=40)
    dec = Decoder(model)
    prompts = prompts_for(lengths=(39, 36, 30, 5, 40, 1), seed=6)
    plain = dec.run(prompts, max_new_tokens=50)
    for n_draft in (None, "auto"):
        assert dec.run(prompts, max_new_tokens=50, speculative=True, n_draft=n_draft).tokens == (
            plain.tokens
        )
    assert [len(t) for t in plain.tokens] == [1, 4, 10, 35, 0, 39]


def test_eos_and_stop_cut_both_modes_at_the_same_token():
    model = copy_chain(4, noise=0.08)
    dec = Decoder(model)
    prompts = prompts_for()
    free = dec.run(prompts, max_new_tokens=30).tokens
    eos = free[2][5]
    decode = lambda ids: "".join(chr(0x100 + i) for i in ids)  # one character per token
    stop_text = decode(free[4][10:12])
    results = []
    for speculative in (False, True):
        stops = [Stopper(eos_id=eos, stop=(stop_text,), decode=decode) for _ in prompts]
        out = dec.run(prompts, max_new_tokens=30, speculative=speculative, stoppers=stops)
        texts = [s.text(t) for s, t in zip(stops, out.tokens)]
        results.append((out.tokens, out.finish_reasons, texts))
    assert results[0] == results[1]
    tokens, reasons, texts = results[0]
    assert "eos" in reasons and "stop" in reasons, reasons
    assert reasons[2] in ("eos", "stop") and eos not in tokens[2]
    assert reasons[4] in ("stop", "eos") and stop_text not in texts[4]
    for toks, full in zip(tokens, free):
        assert toks == full[: len(toks)]


# -- a trained chain ---------------------------------------------------------------------------
def train_chain(tok, n_future: int, steps: int) -> MTPModel:
    """A chain trained on letter runs ("klmnop" lines) for a few seconds: its modules learn
    to continue a run, and miss at line breaks."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ids: list[int] = []
    for text in letter_runs(40, seed=0):
        ids += tok.encode(text) + [tok.eos_id]
    data = torch.tensor(ids)
    cfg = ModelConfig(
        vocab_size=ckpt.padded_vocab(tok.vocab_size),
        d_model=48,
        n_layers=2 + n_future,
        n_attn_heads=4,
        n_future=n_future,
        max_seq_len=128,
        mtp_arch="chained",
        mtp_loss_weight=1.0,
    )
    model = MTPModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    seq = 48
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - n_future, (8,), generator=gen)
        batch = torch.stack([data[s : s + seq + n_future] for s in starts])
        loss = model(batch[:, :seq], batch[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = ByteTokenizer()
    yield tok, train_chain(tok, 4, steps=80)
    torch.set_num_threads(before)


def test_trained_chain_speculative_equals_greedy(trained):
    tok, model = trained
    texts = letter_runs(6, seed=1)
    prompts = [tok.encode(t[7 * i : 7 * i + 30 + 9 * i]) for i, t in enumerate(texts)]
    for dtype in (torch.float64, torch.float32):
        dec = Decoder(model.to(dtype), vocab_limit=tok.vocab_size)
        plain = dec.run(prompts, max_new_tokens=32)
        for n_draft in (None, "auto", 1):
            spec = dec.run(prompts, max_new_tokens=32, speculative=True, n_draft=n_draft)
            assert spec.tokens == plain.tokens, (dtype, n_draft)
        if dtype == torch.float64:
            for p, expected in zip(prompts[:3], plain.tokens):
                assert dec.run([p], max_new_tokens=32, speculative=True).tokens == [expected]
            stats = dec.run(prompts, max_new_tokens=32, speculative=True).stats
            assert 0 < stats.acceptance_rate[-1] <= stats.acceptance_rate[1] < 1, stats.as_dict()
            assert stats.tokens_per_forward > 1.5, stats.as_dict()
            assert stats.mixed_steps > 0


def test_generate_cli_and_generator_on_a_chained_checkpoint(trained, tmp_path, capsys):
    """`mtp generate --compare / --speculative --json` and the Generator (what `mtp eval`
    decodes through) on a chained checkpoint: the same text as plain greedy, counters reported."""
    tok, model = trained
    model = model.float()
    run = tmp_path / "run"
    save_checkpoint(model, tok, run, step=2)
    args = ["generate", "--checkpoint", str(run), "--prompt", "abcdefg\nmnop", "--max-tokens", "40"]
    assert main([*args, "--compare"]) == 0
    setup, plain_line, spec_line = capsys.readouterr().err.strip().splitlines()
    assert setup.startswith("decoding: fp32")
    assert plain_line.startswith("plain greedy: 40 tokens")
    assert "chained modules)" in spec_line and "identical to greedy: yes" in spec_line
    assert main([*args, "--speculative", "--n-draft", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert report["tokens_per_forward"] > 1.5 and len(report["acceptance_rate"]) == 4
    accepted, verified = (
        report["accepted_drafts_per_position"],
        report["verified_drafts_per_position"],
    )
    assert len(accepted) == 3 and 0 < accepted[0] <= verified[0]
    assert main([*args, "--speculative", "--n-draft", "4"]) == 2
    assert "by chained modules" in capsys.readouterr().err
    gen = Generator(model, tok)
    prompts = ["abcdef\nxyz", "klm", "qrstu\nb"]
    texts = {}
    for speculative in (False, True):
        cfg = GenerationConfig(max_tokens=30, stop=("\n\n",), speculative=speculative)
        texts[speculative] = [(c.text, c.finish_reason) for c in gen.generate(prompts, cfg)[0]]
    assert texts[False] == texts[True]
