"""Memory and time of one training step under train.freeze = none / trunk / trunk_and_head1,
on the same model (LocalEngine: the optimizer, clipping and step the trainer runs).

    python bench/freeze.py [--vocab 8192 --d-model 256 --trunk-layers 8 --n-future 4]
                           [--seq 256 --batch 4] [--threads 2] [--timing-rounds 3]

Memory: each variant in a fresh process (the profiler's running total is process-wide and
keeps counting tensors made in an earlier profiled stretch and freed outside one, so a second
`allocated_peak` in one process starts above zero). Time: the three variants in one process,
their steps interleaved. Measured:

- `optimizer MB`: AdamW's state (two moments per trainable parameter), what freezing removes
  for good; `weights MB` is the same for all (a frozen parameter is still held);
- `step MB`: the peak of tensor bytes one train_step allocates beyond the weights and optimizer
  state (activations kept for backward, gradients, transients), from the torch profiler
  (mtp_dist/training/memory.py `allocated_peak`; gradients start as None, as in a step);
- `total MB` = weights + optimizer + step peak;
- `CPU s` / `wall s`: the median over `--timing-rounds` rounds (after one warm-up round) of a
  whole train_step (forward, backward, clipping, AdamW), the variants interleaved round by round
  in one process; CPU time (`time.process_time`, all threads) is what other load on a shared
  machine inflates least, with `--threads 1` (two threads also count each other's spin-waits
  when other processes hold a core).

Under 'trunk' the trunk runs without autograd (no activations kept, no trunk backward);
'trunk_and_head1' also skips head 1's backward and the shared unembedding's gradient.

Prints a table, then one JSON object (last line) with the numbers and the ratios to 'none'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = ("none", "trunk", "trunk_and_head1")


def build(args: argparse.Namespace, mode: str):
    """(LocalEngine, its micro-batch) for freeze `mode`; the same weights for every mode."""
    import torch

    from mtp_dist.config import load_config
    from mtp_dist.model import MTPModel
    from mtp_dist.training.engine import LocalEngine

    over = [
        "run_dir=/tmp/unused",
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.trunk_layers + args.n_future}",  # parameter-matched heads
        f"model.n_attn_heads={args.d_model // 64}",
        f"model.n_future={args.n_future}",
        f"model.max_seq_len={args.seq}",
        f"data.seq_len={args.seq}",
        f"train.micro_batch_size={args.batch}",
        "train.grad_accum_steps=1",
        "train.precision=fp32",
        "train.device=cpu",
        f"train.freeze={mode}",
    ]
    cfg = load_config(None, over)
    torch.manual_seed(0)
    engine = LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)
    gen = torch.Generator().manual_seed(1)
    window = torch.randint(0, args.vocab, (args.batch, args.seq + args.n_future), generator=gen)
    return engine, [window]


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def memory(args: argparse.Namespace, mode: str) -> dict:
    """One variant's counts and memory (in a fresh process: see the module docstring)."""
    import torch

    from mtp_dist.training.memory import allocated_peak

    torch.set_num_threads(args.threads)
    engine, micro = build(args, mode)
    engine.train_step(micro)  # warm-up: AdamW's state exists, first calls are done
    engine.optimizer.zero_grad(set_to_none=True)  # the measured step makes its gradients
    state = [t for s in engine.optimizer.state.values() for t in s.values() if t.dim()]
    step = allocated_peak(lambda: engine.train_step(micro)) / 2**20
    weights, optimizer = tensor_mb(engine.model.parameters()), tensor_mb(state)
    return {
        "trainable": engine.freeze.trainable,
        "frozen": engine.freeze.frozen,
        "weights_mb": round(weights, 1),
        "optimizer_mb": round(optimizer, 1),
        "step_mb": round(step, 1),
        "total_mb": round(weights + optimizer + step, 1),
    }


def timing(args: argparse.Namespace) -> dict:
    """{mode: (CPU s, wall s)}: median train_step times, the variants' steps interleaved."""
    import torch

    torch.set_num_threads(args.threads)
    built = {mode: build(args, mode) for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.timing_rounds + 1):  # round 0 warms up
        for mode, (engine, micro) in built.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            engine.train_step(micro)
            if round_ > 0:
                wall[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
    return {m: (statistics.median(cpu[m]), statistics.median(wall[m])) for m in MODES}


def run_child(role: str):
    cmd = [sys.executable, __file__, "--child", role] + sys.argv[1:]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--trunk-layers", type=int, default=8)
    parser.add_argument("--n-future", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(timing(args) if args.child == "timing" else memory(args, args.child)))
        return
    results = {mode: run_child(mode) for mode in MODES}
    for mode, (cpu, wall) in run_child("timing").items():
        results[mode].update(step_cpu_s=round(cpu, 3), step_wall_s=round(wall, 3))
    header = ("mode", "trainable", "weights MB", "optimizer MB", "step MB", "total MB", "CPU s",
              "wall s")  # fmt: skip
    print(f"{header[0]:<17}" + "".join(f"{h:>13}" for h in header[1:]))
    for mode, r in results.items():
        cells = (f"{r['trainable']:,}", r["weights_mb"], r["optimizer_mb"], r["step_mb"],
                 r["total_mb"], r["step_cpu_s"], r["step_wall_s"])  # fmt: skip
        print(f"{mode:<17}" + "".join(f"{c:>13}" for c in cells))
    none = results["none"]
    ratios = {
        mode: {
            key: round(results[mode][key] / none[key], 3)
            for key in ("optimizer_mb", "step_mb", "total_mb", "step_cpu_s", "step_wall_s")
        }
        for mode in MODES[1:]
    }
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "results": results,
        "ratios_vs_none": ratios,
        "memory_kind": "cpu_allocated_peak",
        "time_kind": "cpu_process_time",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
