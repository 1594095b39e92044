"""Peak memory of one training step: n=1, n=4 naive, n=4 sequential (each in a fresh process).

    python bench/memory.py [--vocab 32000 --d-model 512 --seq 1024 --batch 2 --layers 5]

Each variant runs in its own Python process (peak RSS is per process and never goes down). The
process builds the model and AdamW, allocates the optimizer state, records its resident set, then
runs ONE training step (forward, backward, optimizer step) and reads the peak RSS. `step_mb` is
the peak minus the resident set before the step: the memory the step itself needs (activations,
logits and their gradients, parameter gradients), which is what the loss implementation controls.
`total_mb` is the whole process's peak (Python + torch + weights + optimizer state + step).
Prints a table, then one JSON object (last line) with the peaks and the two ratios (of step_mb).

`--device cuda`: the same step on the GPU, measured with torch.cuda.memory_allocated before the
step and torch.cuda.max_memory_allocated after it (the allocator's own count, not RSS);
`total_mb` is then the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

# n1 is the ordinary next-token model (one graph); n1_sequential shows the trick alone at n = 1.
VARIANTS = {
    "n1": (1, "naive"),
    "n1_sequential": (1, "sequential"),
    "n4_naive": (4, "naive"),
    "n4_sequential": (4, "sequential"),
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
    n_future, impl = VARIANTS[args.child]
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_attn_heads=args.d_model // 64,
        n_future=n_future,
        max_seq_len=args.seq,
        loss_impl=impl,
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
    out = model(inputs, labels)
    out.loss.backward()
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=5, help="layers of the n=1 model")
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
    print(f"{'variant':<15}{'step MB':>10}{'total MB':>10}")
    for name, r in results.items():
        print(f"{name:<15}{r['step_mb']:>10.0f}{r['total_mb']:>10.0f}")
    n1 = results["n1"]
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
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
