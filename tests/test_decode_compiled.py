"""The compiled plain decoding step (inference/compiled.py): static shapes, torch.compile.

Invariants (docs/speculative_decoding.md, "The compiled step"):
  * compiled plain decoding gives the eager path's tokens and the uncached model's greedy
    tokens (float64), batched (rows leaving the batch: the batch size changes) and alone,
    greedy and sampled with one seed;
  * the static step run eagerly (prefills) equals the FusedBlock path;
  * n_draft="auto" on a compiled decoder that decodes plainly runs the compiled step;
    compile="auto" takes it at the batch sizes where it measured faster than the eager one;
  * --compile on where inductor cannot compile is one line naming --compile off; auto
    compiles only for commands decoding COMPILE_PAYS_TOKENS or more.
"""

from __future__ import annotations

import pytest
import torch
from test_inference_cli import run_dir  # noqa: F401 (a fixture)

from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.inference import Decoder
from mtp_dist.inference.auto import StepCosts
from mtp_dist.inference.compiled import COMPILE_PAYS_TOKENS, compiled_faster, want_compile
from mtp_dist.model import MTPModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=4,
        n_attn_heads=4,
        n_kv_heads=2,
        n_future=2,
        max_seq_len=64,
        init_std=0.2,
    )
    return MTPModel(cfg).double().eval()


@pytest.fixture(scope="module")
def compiled(model):
    torch.set_num_threads(1)
    return Decoder(model, vocab_limit=90, compile=True)


def prompts_for(lengths=(1, 4, 9, 15)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 90, (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = model.next_token_logits(torch.tensor([ids]))[0, -1, :90]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_compiled_equals_eager_and_the_model(model, compiled):
    assert compiled.compiled and compiled.compile_seconds > 0
    eager = Decoder(model, vocab_limit=90)
    prompts = prompts_for()
    long = [p * 4 for p in prompts]  # context 64: rows reach its end at different steps
    assert compiled.run(long, max_new_tokens=40).tokens == eager.run(long, max_new_tokens=40).tokens
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    kw = dict(max_new_tokens=15, temperature=0.9, top_p=0.9)
    assert (
        compiled.run(prompts, generator=g1, **kw).tokens
        == eager.run(prompts, generator=g2, **kw).tokens
    )


def test_auto_decoding_plainly_runs_the_compiled_step(model, compiled, monkeypatch):
    calls = []
    step = compiled.static.step
    monkeypatch.setattr(compiled.static, "step", lambda *a: calls.append(1) or step(*a))
    monkeypatch.setattr(compiled, "step_costs", StepCosts({1: 1.0, 2: 2.5}))
    prompts = prompts_for()
    out = compiled.run(prompts, max_new_tokens=10, speculative=True, n_draft="auto")
    assert out.stats.drafts_at_end == 0 and len(calls) == 9  # prefill + 9 compiled steps
    assert out.tokens == [reference_greedy(model, p, 10) for p in prompts]
    # Drafting (eager) on the compiled decoder: greedy still.
    spec = compiled.run(prompts, max_new_tokens=10, speculative=True, n_draft=1)
    assert spec.tokens == out.tokens


def test_compile_auto_takes_the_compiled_step_where_it_measured_faster(
    model, compiled, monkeypatch
):
    """compile="auto": per batch size, the step that measured faster (here injected); the
    measurement itself runs both and answers."""
    calls = []
    step = compiled.static.step
    monkeypatch.setattr(compiled.static, "step", lambda *a: calls.append(1) or step(*a))
    monkeypatch.setattr(compiled, "compile_mode", "auto")
    monkeypatch.setattr(compiled, "_static_pays", {1: False, 4: True})
    prompts = prompts_for()
    alone = compiled.run(prompts[:1], max_new_tokens=6)
    assert calls == []  # eager at batch 1
    batch = compiled.run(prompts, max_new_tokens=6)
    assert len(calls) == 5  # compiled at batch 4
    assert alone.tokens == [reference_greedy(model, prompts[0], 6)]
    assert batch.tokens == [reference_greedy(model, p, 6) for p in prompts]
    assert compiled_faster(compiled, prompts[:2], repeats=2) in (True, False)


def test_want_compile():
    assert want_compile("on", 1) == "on" and want_compile("off", 10**9) == "off"
    assert want_compile("auto", COMPILE_PAYS_TOKENS) == "auto"
    assert want_compile("auto", COMPILE_PAYS_TOKENS - 1) == "off"
    with pytest.raises(ValueError, match="auto, on or off"):
        want_compile("yes", 1)


def test_compile_on_without_a_compiler_is_one_line(run_dir, capsys, monkeypatch, tmp_path):  # noqa: F811
    from torch._inductor import config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # no cached code
    monkeypatch.setattr(config, "fx_graph_cache", False)
    monkeypatch.setattr(config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "ab", "--max-tokens", "4"]
    assert main([*args, "--compile", "on"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mtp generate: --compile on: torch.compile cannot build the decoding")
    assert line.endswith(": use --compile off")
    torch._dynamo.reset()
