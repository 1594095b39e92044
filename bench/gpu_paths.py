"""Check the GPU code paths on one GPU and time them; one JSON object per check, then a summary.

    python bench/gpu_paths.py                  # on a machine with a CUDA GPU
    python bench/gpu_paths.py --device cpu     # dry run of the same code on CPU (gloo, fp32)

Written to be run once on a lent GPU (scripts/gpu_check.sh runs it with the benchmarks). With
one GPU there is one rank: NCCL, Megatron-core's layers and DeepSpeed run at world size 1
(tensor-parallel layers of size 1 still take Megatron's CUDA code path; several ranks on one GPU
are refused by NCCL). Checks:
  env         torch / CUDA / device / bf16 support
  collectives all_reduce, all_gather_into_tensor, reduce_scatter_tensor (what sequence
              parallelism uses) on the backend of the device (NCCL on GPU)
  bf16_matmul bf16 matmul against fp32 (relative error), and its speed
  sdpa_flash  causal scaled_dot_product_attention with the flash kernel forced, bf16, against
              the math kernel in fp32; flash vs math time
  megatron    MTPModel with Megatron-core tensor-parallel layers (size 1) on the device:
              loss and gradients against the same weights in local layers
  deepspeed   DeepSpeedTrainEngine (ZeRO-1, bf16 on GPU) a few steps: finite, falling loss,
              step time
Every check reports "ok" and its numbers; a failure is recorded with its error and the others
still run. The exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/heads.py
from heads import free_port  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def check_env(device: torch.device) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))  # fmt: skip
    return out


def check_collectives(device: torch.device) -> dict:
    x = torch.arange(8, dtype=torch.float32, device=device)
    y = x.clone()
    dist.all_reduce(y)
    gathered = torch.empty(8, device=device)
    dist.all_gather_into_tensor(gathered, x)
    scattered = torch.empty(8, device=device)
    dist.reduce_scatter_tensor(scattered, x)
    ok = torch.equal(y, x) and torch.equal(gathered, x) and torch.equal(scattered, x)
    big = torch.ones((64 if device.type == "cuda" else 4) * 2**20 // 4, device=device)
    seconds = _time(lambda: dist.all_reduce(big), device, repeats=5)
    return {"ok": ok, "backend": dist.get_backend(), "all_reduce_MiB": big.numel() * 4 / 2**20,
            "all_reduce_s": seconds}  # fmt: skip


def check_bf16_matmul(device: torch.device) -> dict:
    n = 4096 if device.type == "cuda" else 512  # the CPU dry run only checks the code runs
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    ref = a @ b
    low = (a.bfloat16() @ b.bfloat16()).float()
    rel = float((low - ref).norm() / ref.norm())
    ab, bb = a.bfloat16(), b.bfloat16()
    seconds = _time(lambda: ab @ bb, device)
    return {"ok": rel < 1e-2, "relative_error": rel, "size": n, "tflops": 2 * n**3 / seconds / 1e12}


def check_sdpa_flash(device: torch.device) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return {"ok": True, "skipped": "flash attention kernel is CUDA-only"}
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2048, 64, device=device, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        flash_s = _time(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True), device)
    with sdpa_kernel([SDPBackend.MATH]):
        math_s = _time(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True), device)
    err = float((flash.float() - ref).abs().max())
    return {"ok": err < 5e-2, "max_abs_error_vs_fp32": err, "flash_s": flash_s, "math_s": math_s,
            "math_over_flash": math_s / flash_s}  # fmt: skip


def _tiny_config(run_dir: str, device: torch.device, extra: list[str] = ()):
    from mtp_dist.config import load_config

    over = [f"run_dir={run_dir}", "model.vocab_size=512", "model.d_model=256",
            "model.n_attn_heads=4", "model.n_layers=6", "model.n_future=4",
            "model.max_seq_len=256", "data.seq_len=256", "train.micro_batch_size=8",
            "train.grad_accum_steps=1", "train.lr=3e-3", "train.warmup_steps=2",
            f"train.device={device.type}", "tracking.enabled=false", *extra]  # fmt: skip
    return load_config(None, over)


def check_megatron(device: torch.device) -> dict:
    from mtp_dist.distributed.tensor_parallel import MegatronLayers, load_initial_params
    from mtp_dist.model import MTPModel, parameter_table, split_window
    from mtp_dist.model.init import initial_parameters

    cfg = _tiny_config("/tmp/unused", device).model
    table = parameter_table(cfg)
    reference = MTPModel(cfg).to(device)
    load_initial_params(reference, initial_parameters(cfg, 0), table, 0, 1)
    model = MTPModel(cfg, MegatronLayers(cfg.init_std, torch.float32)).to(device)
    load_initial_params(model, initial_parameters(cfg, 0), table, 0, 1)
    g = torch.Generator().manual_seed(0)
    inputs, labels = split_window(torch.randint(0, 512, (4, 260), generator=g).to(device), 256)
    losses, grads = [], []
    for net in (reference, model):
        out = net(inputs, labels)
        out.loss.backward()
        losses.append(float(out.loss))
        grads.append(dict((n, p.grad) for n, p in net.named_parameters()))
    worst = max(float((grads[1][n] - g).abs().max()) for n, g in grads[0].items())
    return {"ok": abs(losses[0] - losses[1]) < 1e-4 and worst < 1e-4, "loss_local": losses[0],
            "loss_megatron": losses[1], "max_grad_diff": worst}  # fmt: skip


def check_deepspeed(device: torch.device) -> dict:
    from mtp_dist.distributed.engine import DeepSpeedTrainEngine
    from mtp_dist.distributed.topology import Topology

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tiny_config(tmp, device, ["parallel.zero_stage=1"])
        engine = DeepSpeedTrainEngine(cfg, Topology.from_config(cfg.parallel, 1), 0, device)
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(0, 512, (8, 260), generator=g)
        losses, times = [], []
        for _ in range(8):
            _sync(device)
            start = time.perf_counter()
            losses.append(engine.train_step([batch]).loss)
            _sync(device)
            times.append(time.perf_counter() - start)
    finite = all(math.isfinite(loss) for loss in losses)
    return {"ok": finite and losses[-1] < losses[0], "bf16": engine.bf16, "losses": losses,
            "step_s_median": sorted(times)[len(times) // 2]}  # fmt: skip


CHECKS = {
    "env": check_env,
    "collectives": check_collectives,
    "bf16_matmul": check_bf16_matmul,
    "sdpa_flash": check_sdpa_flash,
    "megatron": check_megatron,
    "deepspeed": check_deepspeed,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))  # fmt: skip
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    results = {}
    for name in args.only:
        start = time.perf_counter()
        try:
            result = CHECKS[name](device)
        except Exception as err:  # a failed check is a result, the others still run
            result = {"ok": False, "error": repr(err), "trace": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = result
        print(json.dumps({"check": name, **result}), flush=True)
    summary = {"gpu_paths_ok": all(r.get("ok", True) for r in results.values()),
               "failed": [n for n, r in results.items() if r.get("ok") is False]}  # fmt: skip
    print(json.dumps(summary))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if summary["gpu_paths_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
