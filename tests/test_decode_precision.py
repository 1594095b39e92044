"""--dtype auto|fp32|bf16 for decoding (inference/precision.py) and bf16 decoding itself.

Invariants (docs/speculative_decoding.md, "Precision"):
  * auto is bf16 on CUDA and on a CPU whose flags name amx_bf16 or avx512_bf16 (and, with a
    shape given, where one row of it runs faster in bf16), fp32 elsewhere; bf16 without native
    support is allowed, with a warning;
  * casting keeps the rotary tables fp32; the fused rotary rotates bf16 q/k (view_as_complex
    takes no bf16) as fp32 does, to bf16 rounding;
  * bf16 models decode, plain and speculative, in both families, and where the logits have
    margins speculative output equals plain greedy in bf16 too;
  * `mtp generate --dtype bf16` on a CPU without native bf16 runs and warns in one line.
"""

from __future__ import annotations

import pytest
import torch
from test_chain_decode import copy_chain
from test_inference_cli import run_dir  # noqa: F401 (a fixture)

from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.inference import Decoder
from mtp_dist.inference import precision as P
from mtp_dist.inference.fused import rotary_table, rotate
from mtp_dist.model import MTPModel


def test_native_bf16_from_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 sha_ni\n")
    assert P.cpu_flags(info) >= {"avx2", "avx512_bf16"}
    assert P.native_bf16(P.cpu_flags(info)) == "avx512_bf16"
    assert P.native_bf16({"amx_bf16", "amx_tile", "avx512_bf16"}) == "amx_bf16"
    assert P.native_bf16({"avx2", "fma"}) is None
    assert P.cpu_flags(tmp_path / "missing") == set()


def test_resolve_dtype():
    amx, avx2 = {"amx_bf16"}, {"avx2"}
    assert P.resolve_dtype("auto", "cpu", amx) == (torch.bfloat16, None)
    assert P.resolve_dtype("auto", "cpu", avx2) == (torch.float32, None)
    assert P.resolve_dtype("auto", "cuda", avx2) == (torch.bfloat16, None)
    assert P.resolve_dtype("fp32", "cpu", amx) == (torch.float32, None)
    dtype, warning = P.resolve_dtype("bf16", "cpu", avx2)
    assert dtype == torch.bfloat16 and "without native bf16" in warning
    with pytest.raises(ValueError, match="one of auto, fp32, bf16"):
        P.resolve_dtype("fp16")


def test_auto_follows_the_measured_matmul(monkeypatch):
    """Native bf16, but one row of the model's matmul slower in bf16: auto stays fp32."""
    monkeypatch.setattr(P, "bf16_matmul_faster", lambda k, n: False)
    assert P.resolve_dtype("auto", "cpu", {"avx512_bf16"}, shape=(8, 16))[0] == torch.float32
    monkeypatch.setattr(P, "bf16_matmul_faster", lambda k, n: True)
    assert P.resolve_dtype("auto", "cpu", {"avx512_bf16"}, shape=(8, 16))[0] == torch.bfloat16
    monkeypatch.undo()
    assert P.bf16_matmul_faster(16, 32, repeats=2) in (True, False)  # it runs


def small_model(n_future: int = 3) -> MTPModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=1 + n_future, n_attn_heads=4, n_future=n_future
    )
    return MTPModel(cfg).eval()


def test_cast_keeps_rotary_tables_and_rotates_bf16():
    model = P.cast_parameters(small_model(), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32
    freqs = rotary_table(model)[:5][None, :, None]  # (1, 5, 1, hd/2) complex64
    assert freqs.dtype == torch.complex64
    x = torch.randn(2, 5, 4, 8).to(torch.bfloat16)
    got = rotate(x, freqs)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, rotate(x.float(), freqs).to(torch.bfloat16))
    # A model cast whole (buffers too) still gets a complex table.
    assert rotary_table(small_model().to(torch.bfloat16)).dtype == torch.complex64


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_decodes_both_modes(fused):
    model = P.cast_parameters(small_model(), torch.bfloat16)
    dec = Decoder(model, fused=fused)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    plain = dec.run(prompts, max_new_tokens=12)
    spec = dec.run(prompts, max_new_tokens=12, speculative=True, n_draft=2)
    assert [len(t) for t in plain.tokens] == [len(t) for t in spec.tokens] == [12, 12]


def test_bf16_chain_with_margins_speculates_exactly():
    """A copy chain (logits with wide margins) in bf16: speculative == plain greedy."""
    model = copy_chain(4, noise=0.0).float()
    P.cast_parameters(model, torch.bfloat16)
    dec = Decoder(model)
    prompts = [[1, 2, 3], [9, 10]]
    plain = dec.run(prompts, max_new_tokens=20)
    spec = dec.run(prompts, max_new_tokens=20, speculative=True, n_draft=3)
    assert spec.tokens == plain.tokens
    assert spec.stats.tokens_per_forward > 3


def test_generate_bf16_without_native_warns(run_dir, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(P, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2"})
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "ab", "--max-tokens", "4"]
    assert main([*args, "--dtype", "bf16"]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "warning" in line]
    assert warnings == [
        "mtp generate: warning: --dtype bf16 on a CPU without native bf16 matmul (no amx_bf16 "
        "or avx512_bf16 flag): expect it slower than fp32"
    ]
    assert any(line.startswith("decoding: bf16 (CPU native bf16: no)") for line in err)
    assert main([*args, "--dtype", "fp32"]) == 0
    assert "decoding: fp32" in capsys.readouterr().err
