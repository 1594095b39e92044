"""Peak memory of one training step: n=1, n=4 naive / sequential / chunked (fresh processes).

    python bench/memory.py [--vocab 32000 --d-model 512 --seq 1024 --batch 2 --layers 5]
                           [--loss-chunk 256] [--time-steps 1]

Each variant runs in its own Python process (peak RSS is per process and never goes down). The
process builds the model and AdamW, allocates the optimizer state, records its resident set, then
runs ONE training step (forward, backward, optimizer step) and reads the peak RSS. `step_mb` is
the peak minus the resident set before the step: the memory the step itself needs (activations,
logits and their gradients, parameter gradients), which is what the loss implementation controls.
`total_mb` is the whole process's peak (Python + torch + weights + optimizer state + step).
`step_s` is the wall time of `--time-steps` further steps (median), taken after the measured one
so that first-touch page faults are not in it.
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

# name -> (n_future, loss_impl, chunked). n1 is the ordinary next-token model (one graph);
# n1_sequential shows the trick alone at n = 1; n4_chunked adds `--loss-chunk` to sequential.
VARIANTS = {
    "n1": (1, "naive", False),
    "n1_sequential": (1, "sequential", False),
    "n4_naive": (4, "naive", False),
    "n4_sequential": (4, "sequential", False),
    "n4_chunked": (4, "sequential", True),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(args: argparse.Namespace) -> dict:
    import torch

    from mtp_dist.config import ModelConfig
    from mtp_dist.model import MTPModel, split_window

    torch.manual_seed(0)
    torch.set_num_threads(2)
    n_future, impl, chunked = VARIANTS[args.child]
    cfg = ModelConfig(
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # allocate Adam's moments before the measured step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    window = torch.randint(0, args.vocab, (args.batch, args.seq + n_future), device=device)
    inputs, labels = split_window(window, args.seq)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(inputs, labels).loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = step()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    times = [step() for _ in range(args.time_steps)] or [first]
    return {
        "total_mb": round(peak, 1),
        "step_mb": round(peak - before, 1),
        "before_mb": round(before, 1),
        "step_s": round(statistics.median(times), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=5, help="layers of the n=1 model")
    parser.add_argument("--loss-chunk", type=int, default=256, help="tokens, n4_chunked")
    parser.add_argument("--time-steps", type=int, default=1, help="timed steps after it")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    print(f"{'variant':<15}{'step MB':>10}{'total MB':>10}{'step s':>10}")
    for name, r in results.items():
        print(f"{name:<15}{r['step_mb']:>10.0f}{r['total_mb']:>10.0f}{r['step_s']:>10.2f}")
    n1, seq = results["n1"], results["n4_sequential"]
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
        "ratio_chunked_n4_vs_n1": round(results["n4_chunked"]["step_mb"] / n1["step_mb"], 3),
        "ratio_step_time_chunked_vs_sequential": round(
            results["n4_chunked"]["step_s"] / seq["step_s"], 3
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
