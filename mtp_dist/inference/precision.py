"""Precision of decoding and evaluation: `--dtype auto|fp32|bf16`.

bf16 halves the bytes of every weight read, and on CPUs with native bf16 matmul (AMX tiles, or
the AVX512-BF16 dot-product instructions) the matmuls themselves run faster; elsewhere a CPU
converts bf16 to fp32 around every matmul and runs slower than fp32. So `auto` is bf16 on a GPU
and on a CPU whose flags name amx_bf16 or avx512_bf16 (and where that runs faster, below),
fp32 elsewhere; bf16 on a CPU without
them runs, with one line saying it will be slow.

On CPUs `auto` also times one row of the model's largest matmul in both (`bf16_matmul_faster`):
on an AMD EPYC with AVX512-BF16 and no AMX, bf16 was slower there for one row (decoding's
shape), so `auto` stays fp32 where that holds.

Only the parameters change dtype: the rotary tables stay fp32 (positions up to the context end
need more than bf16's 8 bits), and the model's own modules compute norms in fp32 as in training.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

CHOICES = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(flags: set[str] | None = None) -> str | None:
    """The native bf16 matmul feature of this CPU ('amx_bf16' or 'avx512_bf16'), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


_FASTER: dict[tuple, bool] = {}


def bf16_matmul_faster(k: int, n: int, repeats: int = 20) -> bool:
    """Whether a (1 x k)·(k x n) matmul, a decoding step's, runs faster in bf16 than in fp32 on
    this CPU (best of `repeats`, alternating; cached per shape and thread count). Native bf16
    is not enough: on an AMD EPYC with AVX512-BF16 (no AMX) one row took 1.7-2.4x as long in
    bf16 as in fp32, whose one-row matmul has a path of its own (docs/benchmarks.md,
    "Decoding on this machine")."""
    key = (k, n, torch.get_num_threads())
    if key not in _FASTER:
        best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
        pairs = {dt: (torch.randn(1, k).to(dt), torch.randn(k, n).to(dt)) for dt in best}
        for _ in range(repeats):
            for dt, (x, w) in pairs.items():
                start = time.perf_counter()
                x @ w
                best[dt] = min(best[dt], time.perf_counter() - start)
        _FASTER[key] = best[torch.bfloat16] < best[torch.float32]
    return _FASTER[key]


def resolve_dtype(
    name: str,
    device: str | torch.device = "cpu",
    flags: set[str] | None = None,
    shape: tuple[int, int] | None = None,
) -> tuple[torch.dtype, str | None]:
    """(dtype, warning or None) for --dtype `name` on `device`. `shape`: the model's largest
    decoding matmul (k, n); given, `auto` on a CPU with native bf16 also requires one row of
    it to run faster in bf16 (`bf16_matmul_faster`)."""
    if name not in CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, got {name!r}")
    cuda = torch.device(device).type == "cuda"
    native = cuda or native_bf16(flags) is not None
    if name == "fp32" or (name == "auto" and not native):
        return torch.float32, None
    if name == "auto" and not cuda and shape is not None and not bf16_matmul_faster(*shape):
        return torch.float32, None
    warning = None
    if not native:
        warning = (
            "--dtype bf16 on a CPU without native bf16 matmul (no amx_bf16 or avx512_bf16 "
            "flag): expect it slower than fp32"
        )
    return torch.bfloat16, warning


def describe(dtype: torch.dtype, device: str | torch.device = "cpu") -> str:
    """'bf16 (CPU has native bf16: avx512_bf16)' and the like, for the lines a run prints."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype)
    )
    if torch.device(device).type == "cuda":
        return f"{name} on CUDA"
    native = native_bf16()
    return f"{name} (CPU native bf16: {native or 'no'})"


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its parameters in `dtype` (in place), buffers (rotary tables) kept."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def largest_matmul(model) -> tuple[int, int]:
    """(k, n) of the model's largest per-token matmul: the unembedding or the MLP's gate/up."""
    cfg = model.cfg
    return max((cfg.d_model, cfg.vocab_size), (cfg.d_model, 2 * cfg.ffn_width), key=lambda s: s[1])


def for_decoding(model, name: str, device: str | torch.device = "cpu"):
    """(model cast to --dtype `name`, warning or None): what `mtp generate` / `mtp eval` run."""
    dtype, warning = resolve_dtype(name, device, shape=largest_matmul(model))
    return cast_parameters(model, dtype), warning
