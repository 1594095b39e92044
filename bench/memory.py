"""Peak memory of one training step: n=1, n=4 naive / sequential / chunked, and activation
recompute (each variant in a fresh process), with step times measured side by side.

    python bench/memory.py [--vocab 32000 --d-model 512 --seq 1024 --batch 2 --layers 5]
                           [--loss-chunk 256] [--recompute selective,full] [--timing-rounds 2]

Each variant runs in its own Python process (peak RSS is per process and never goes down). The
process builds the model and AdamW, allocates the optimizer state, records its resident set, then
runs ONE training step (forward, backward, optimizer step) and reads the peak RSS. `step_mb` is
the peak minus the resident set before the step: the memory the step itself needs (activations,
logits and their gradients, parameter gradients), which is what the loss implementation controls.
`total_mb` is the whole process's peak (Python + torch + weights + optimizer state + step).
`step_s` is that step's wall time (its own process; noisy on a shared machine).

Variants: n1 (the ordinary next-token model, one graph), n1_sequential (the trick alone at n = 1),
n4_naive, n4_sequential, n4_chunked (sequential + `model.loss_chunk`), the chained family
(`model.mtp_arch=chained`, n = 4: depth 0 + 3 modules) chained4_sequential (the trick on the
chain: one depth's logits alive) and chained4_naive (every depth's logits alive until one
backward, as Megatron-core's multi_token_prediction.py keeps them), and for each `--recompute`
mode `n1_recompute_<mode>` and `n4_chunked_recompute_<mode>` (`train.recompute`, applied as the
engines apply it). Same layer count in all (n = 4 is parameter-matched: the parallel family's
1 trunk + 4 head layers, the chain's 1 trunk layer + depth 0 + 3 modules).

The chain's goal is stated against an ordinary n = 1 step PLUS the modules' own activations:
`chained_modules_own_mb` is the planner's step memory of the chained n = 4 model minus its
n = 1 model's (mtp_dist/plan.py `chain_elements`, fp32, this batch: every depth's output norm,
output and output gradient and each module's embedded token, enorm/hnorm and concatenation;
the blocks are the n = 1 model's layers, parameter-matched) and
`ratio_chained_sequential_vs_n1_plus_modules` = chained4_sequential step_mb / (n1 step_mb +
that); goal <= 1.15.

Step-time ratios come from one more process that runs the compared variants' steps interleaved
(forward + backward, no optimizer step: it is the same in every variant), `--timing-rounds`
rounds after one warm-up round, median per variant. On the CPU the ratios are of the process's
CPU time (`time.process_time`, both threads), which other processes' load does not inflate the
way it inflates wall time on a shared machine; on a GPU, of synchronised wall time.

Prints a table, then one JSON object (last line) with the peaks and the ratios (of step_mb).

`--device cuda`: the same step on the GPU, measured with torch.cuda.memory_allocated before the
step and torch.cuda.max_memory_allocated after it (the allocator's own count, not RSS);
`total_mb` is then the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# name -> (n_future, loss_impl, chunked, mtp_arch)
BASE = {
    "n1": (1, "naive", False, "parallel"),
    "n1_sequential": (1, "sequential", False, "parallel"),
    "n4_naive": (4, "naive", False, "parallel"),
    "n4_sequential": (4, "sequential", False, "parallel"),
    "n4_chunked": (4, "sequential", True, "parallel"),
    "chained4_sequential": (4, "sequential", False, "chained"),
    "chained4_naive": (4, "naive", False, "chained"),
}
RECOMPUTED = ("n1", "n4_chunked")  # the variants also measured under each --recompute mode


def variants(modes: list[str]) -> list[str]:
    return list(BASE) + [f"{base}_recompute_{mode}" for mode in modes for base in RECOMPUTED]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def build(args: argparse.Namespace, name: str):
    """(model, inputs, labels) of variant `name`, on args.device."""
    import torch

    from mtp_dist.config import ModelConfig
    from mtp_dist.model import MTPModel, split_window
    from mtp_dist.training.engine import apply_recompute

    base, _, mode = name.partition("_recompute_")
    n_future, impl, chunked, arch = BASE[base]
    torch.manual_seed(0)
    cfg = ModelConfig(
        mtp_arch=arch,
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_attn_heads=args.d_model // 64,
        n_future=n_future,
        max_seq_len=args.seq,
        loss_impl=impl,
        loss_chunk=args.loss_chunk if chunked else 0,
    )
    device = torch.device(args.device)
    model = MTPModel(cfg).to(device)
    apply_recompute(model, mode or "none")
    window = torch.randint(0, args.vocab, (args.batch, args.seq + n_future), device=device)
    return (model, *split_window(window, args.seq))


def measure(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(2)
    model, inputs, labels = build(args, args.child)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # allocate Adam's moments before the measured step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    start = time.perf_counter()
    model(inputs, labels).loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "total_mb": round(peak, 1),
        "step_mb": round(peak - before, 1),
        "before_mb": round(before, 1),
        "step_s": round(time.perf_counter() - start, 3),
    }


def planned_step_mb(args: argparse.Namespace, name: str) -> float:
    """The planner's step memory (MB, fp32, one process) of variant `name`'s model and batch."""
    from mtp_dist.config import load_config
    from mtp_dist.plan import Layout, param_counts, plan_layout

    n_future, impl, chunked, arch = BASE[name]
    over = [f"model.vocab_size={args.vocab}", f"model.d_model={args.d_model}",
            f"model.n_layers={args.layers}", f"model.n_attn_heads={args.d_model // 64}",
            f"model.n_future={n_future}", f"model.mtp_arch={arch}", f"model.loss_impl={impl}",
            f"model.loss_chunk={args.loss_chunk if chunked else 0}", f"data.seq_len={args.seq}",
            f"model.max_seq_len={args.seq}", f"train.micro_batch_size={args.batch}",
            "train.precision=fp32", "run_dir=unused"]  # fmt: skip
    cfg = load_config(None, over)
    return plan_layout(cfg, Layout(), float("inf"), param_counts(cfg)).ranks[0].step / 2**20


def timing(args: argparse.Namespace, names: list[str]) -> dict:
    """Median forward + backward seconds per variant, the variants' steps interleaved: wall
    time ("wall") and this process's CPU time ("cpu", both threads)."""
    import torch

    torch.set_num_threads(2)
    built = {name: build(args, name) for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.timing_rounds + 1):  # round 0 warms up (first calls are slow)
        for name, (model, inputs, labels) in built.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model(inputs, labels).loss.backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            model.zero_grad(set_to_none=True)  # one model's gradients in memory at a time
    median = lambda runs: {name: round(statistics.median(t), 3) for name, t in runs.items()}
    return {"wall": median(wall), "cpu": median(cpu)}


def run_child(role: str) -> dict:
    cmd = [sys.executable, __file__, "--child", role] + sys.argv[1:]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=5, help="layers of the n=1 model")
    parser.add_argument("--loss-chunk", type=int, default=256, help="tokens, n4_chunked")
    parser.add_argument("--recompute", default="selective,full", help="modes, comma-separated")
    parser.add_argument("--timing-rounds", type=int, default=2, help="0: no interleaved timing")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = [m for m in args.recompute.split(",") if m]
    timed = ["n4_sequential", "n4_chunked", "n1"]
    timed += [f"{base}_recompute_{mode}" for mode in modes for base in RECOMPUTED]
    if args.child == "timing":
        print(json.dumps(timing(args, timed)))
        return
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {name: run_child(name) for name in variants(modes)}
    timed_runs = run_child("timing") if args.timing_rounds > 0 else {"wall": {}, "cpu": {}}
    times = timed_runs["wall" if args.device == "cuda" else "cpu"]
    label = "wall s" if args.device == "cuda" else "CPU s"
    print(f"{'variant':<30}{'step MB':>10}{'total MB':>10}{'step s':>10}{label:>15}")
    for name, r in results.items():
        interleaved = f"{times[name]:>15.2f}" if name in times else f"{'':>15}"
        print(f"{name:<30}{r['step_mb']:>10.0f}{r['total_mb']:>10.0f}{r['step_s']:>10.2f}"
              f"{interleaved}")  # fmt: skip
    n1, chunked = results["n1"], results["n4_chunked"]
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "peaks": results,
        "memory_kind": "cuda_max_allocated" if args.device == "cuda" else "cpu_peak_rss",
        "ratio_sequential_vs_n1": round(results["n4_sequential"]["step_mb"] / n1["step_mb"], 3),
        "ratio_naive_vs_n1": round(results["n4_naive"]["step_mb"] / n1["step_mb"], 3),
        "ratio_total_sequential_vs_n1": round(
            results["n4_sequential"]["total_mb"] / n1["total_mb"], 3
        ),
        "ratio_total_naive_vs_n1": round(results["n4_naive"]["total_mb"] / n1["total_mb"], 3),
        "ratio_chunked_n4_vs_n1": round(chunked["step_mb"] / n1["step_mb"], 3),
        "interleaved_step_s": timed_runs["wall"],
        "interleaved_step_cpu_s": timed_runs["cpu"],
        "time_kind": "cuda_wall" if args.device == "cuda" else "cpu_process_time",
    }
    # The chain: one depth's logits alive (sequential) against an ordinary n = 1 step plus what
    # the chain keeps beyond it (the planner's count, module docstring).
    own = planned_step_mb(args, "chained4_sequential") - planned_step_mb(args, "n1")
    chained = results["chained4_sequential"]["step_mb"]
    summary["chained_modules_own_mb"] = round(own, 1)
    summary["ratio_chained_sequential_vs_n1"] = round(chained / n1["step_mb"], 3)
    summary["ratio_chained_naive_vs_n1"] = round(
        results["chained4_naive"]["step_mb"] / n1["step_mb"], 3
    )
    summary["ratio_chained_naive_vs_sequential"] = round(
        results["chained4_naive"]["step_mb"] / chained, 3
    )
    ratio = chained / (n1["step_mb"] + own)
    summary["ratio_chained_sequential_vs_n1_plus_modules"] = round(ratio, 3)
    summary["chained_goal_met"] = ratio <= 1.15
    if times:
        summary["ratio_step_time_chunked_vs_sequential"] = round(
            times["n4_chunked"] / times["n4_sequential"], 3
        )
    # Per recompute mode and recomputed variant: step memory saved (MB, and as a fraction of
    # that variant's step without recompute) and step time paid (interleaved, x no recompute,
    # of `time_kind`).
    summary["recompute"] = {
        mode: {
            base: {
                "step_mb_saved": round(
                    results[base]["step_mb"] - results[f"{base}_recompute_{mode}"]["step_mb"], 1
                ),
                "ratio_step_mb": round(
                    results[f"{base}_recompute_{mode}"]["step_mb"] / results[base]["step_mb"], 3
                ),
                **(
                    {"ratio_step_time": round(times[f"{base}_recompute_{mode}"] / times[base], 3)}
                    if times
                    else {}
                ),
            }
            for base in RECOMPUTED
        }
        for mode in modes
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
