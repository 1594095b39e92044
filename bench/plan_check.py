"""The planner checked against measured runs: per-rank step memory predicted by mtp_dist/plan.py
vs measured, on CPU layouts (one process, ZeRO 1/2/3 on 2 ranks, TP 2, PP 2, head 2, recompute).

    python bench/plan_check.py [--layouts single,zero1,...] [--d-model 128 --layers 10
                               --vocab 2048 --seq 256 --batch 8]

Each layout runs in fresh processes (gloo on 127.0.0.1; one process for `single`, which is
LocalEngine as `mtp train` uses it). Every rank builds the engine `mtp train` would build, runs
one warm-up step (so the optimizer state exists and the first-call allocations are made),
resets its peak resident set (`echo 5 > /proc/self/clear_refs` resets VmHWM), reads VmRSS,
runs a second step and reads VmHWM. `measured_step_mb` = VmHWM - VmRSS before that step: what
the step itself adds on top of weights and optimizer state — the activations, the heads' loss
and the gradients the engine frees between steps — plus what glibc keeps and minus pages never
touched. A third step runs under torch's profiler: `allocated_step_mb` is the peak of live
tensor bytes it adds (mtp_dist/training/memory.py; a GPU's max_memory_allocated), which is
what the plan predicts and what `error_allocated` compares. `predicted_step_mb` is the plan's
step peak (`RankMemory.step`: activations + buckets + the larger of workspace and heads, + the
gradients for the DeepSpeed engines, which free them after each step; LocalEngine keeps them
from one step to the next, so they exist before the step). The worst rank is compared (max
over ranks). `model_states_mb` is the plan's weights +
gradients + optimizer for that rank, shown, not compared (RSS cannot separate it from torch,
Megatron and DeepSpeed's own allocations). Prints a table and one JSON object (last line).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (world, parallel overrides, train.recompute)
LAYOUTS = {
    "single": (1, {}, "none"),
    "single_full": (1, {}, "full"),
    "zero1": (2, {"zero_stage": 1}, "none"),
    "zero2": (2, {"zero_stage": 2}, "none"),
    "zero3": (2, {"zero_stage": 3}, "none"),
    "zero1_selective": (2, {"zero_stage": 1}, "selective"),
    "tp2": (2, {"tensor": 2}, "none"),
    "pp2": (2, {"pipeline": 2}, "none"),
    "head2": (2, {"head": 2}, "none"),
}


def config(args: argparse.Namespace, name: str, run_dir: str):
    from mtp_dist.config import load_config

    _, parallel, recompute = LAYOUTS[name]
    over = [
        f"run_dir={run_dir}",
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_attn_heads={args.d_model // 32}",
        f"model.n_layers={args.layers}",
        "model.n_future=4",
        f"model.max_seq_len={args.seq}",
        "model.pad_id=0",
        f"data.seq_len={args.seq}",
        f"train.micro_batch_size={args.batch}",
        f"train.device={args.device}",
        "train.precision=fp32",
        f"train.recompute={recompute}",
        *(f"parallel.{k}={v}" for k, v in parallel.items()),
    ]
    return load_config(None, over)


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB (2**20)
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(1)
    world = LAYOUTS[args.layout][0]
    cfg = config(args, args.layout, tempfile.mkdtemp())
    if world == 1:
        from mtp_dist.model import MTPModel
        from mtp_dist.training.engine import LocalEngine

        torch.manual_seed(0)
        engine = LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)
        rows, runtime = cfg.train.micro_batch_size, None
    else:
        from mtp_dist.distributed import LaunchEnv
        from mtp_dist.distributed.runtime import DistributedRuntime

        env = LaunchEnv(args.child, world, 0, "127.0.0.1", args.port)
        runtime = DistributedRuntime(cfg, env)
        engine = runtime.build_engine(cfg)
        rows = cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(args.child)
    windows = [torch.randint(1, args.vocab, (rows, args.seq + 4), generator=gen) for _ in range(2)]
    engine.train_step([windows[0]])  # warm-up: optimizer state, first-call allocations
    # glibc keeps the warm-up step's freed activations resident (its mmap threshold grows after
    # large frees, so they come from the heap): give them back, or step 2 reuses them unseen.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    engine.train_step([windows[1]])
    peak = _status("VmHWM")
    from mtp_dist.training.memory import allocated_peak

    if args.device == "cuda":  # the allocator's own count; RSS says nothing of GPU memory
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.train_step([windows[0]])
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated() - start
    else:
        allocated = allocated_peak(lambda: engine.train_step([windows[0]]))
    if runtime is not None:
        runtime.close()
    return {"rank": args.child, "before_mb": round(before, 1), "step_mb": round(peak - before, 1),
            "allocated_step_mb": round(allocated / 2**20, 1)}  # fmt: skip


def predicted(args: argparse.Namespace, name: str) -> dict:
    from mtp_dist.plan import layout_of, param_counts, plan_layout

    world = LAYOUTS[name][0]
    cfg = config(args, name, "plan")
    lay = layout_of(cfg, world)
    plan = plan_layout(cfg, lay, float("inf"), param_counts(cfg))
    if plan.error:
        raise SystemExit(f"plan_check: layout {name}: {plan.error}")
    grads = 0 if lay.local_engine else 1
    steps = [r.step + grads * r.gradients for r in plan.ranks]
    states = [r.weights + r.gradients + r.optimizer for r in plan.ranks]
    return {
        "predicted_step_mb": round(max(steps) / 2**20, 1),
        "model_states_mb": round(max(states) / 2**20, 1),
        "layout": lay.name(),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, name: str) -> dict:
    world, port = LAYOUTS[name][0], free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = [a for a in sys.argv[1:]]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                *argv,
                "--layout",
                name,
                "--child",
                str(rank),
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    ranks = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"plan_check: layout {name} failed: {err.strip().splitlines()[-1]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "measured_step_mb": max(r["step_mb"] for r in ranks),
        "allocated_step_mb": max(r["allocated_step_mb"] for r in ranks),
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=10, help="n_layers (4 of them heads)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="cuda: one-process layouts only (one GPU), measured by the CUDA allocator",
    )  # fmt: skip
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"plan_check: unknown layout {unknown[0]!r} (known: {', '.join(LAYOUTS)})")
    if args.device == "cuda" and any(LAYOUTS[n][0] > 1 for n in names):
        raise SystemExit(
            "plan_check: --device cuda measures one-process layouts only "
            "(--layouts single,single_full)"
        )
    rows = {}
    print(f"{'layout':<16}{'plan layout':<30}{'states MB':>10}{'pred MB':>9}{'alloc MB':>9}"
          f"{'err':>8}{'RSS MB':>9}{'err':>8}")  # fmt: skip
    for name in names:
        row = {**predicted(args, name), **measure(args, name)}
        row["error"] = round(row["predicted_step_mb"] / row["measured_step_mb"] - 1, 3)
        row["error_allocated"] = round(row["predicted_step_mb"] / row["allocated_step_mb"] - 1, 3)
        rows[name] = row
        print(
            f"{name:<16}{row['layout']:<30}{row['model_states_mb']:>10.1f}"
            f"{row['predicted_step_mb']:>9.1f}{row['allocated_step_mb']:>9.1f}"
            f"{row['error_allocated']:>+8.1%}{row['measured_step_mb']:>9.1f}"
            f"{row['error']:>+8.1%}",
            flush=True,
        )
    config_ = {k: v for k, v in vars(args).items() if k not in ("layout", "child", "port")}
    print(json.dumps({"config": config_, "layouts": rows}))


if __name__ == "__main__":
    main()
