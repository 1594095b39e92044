"""Training step time of the default recipe with the old and new CPU thread defaults, each alone
and with a busy process holding one core.

    python bench/threads.py [--steps 30 --warmup 3 --max-seconds 60 --rounds 1]
    python bench/threads.py --variant 1thread:OMP_NUM_THREADS=1 --variant spin:GOMP_SPINCOUNT=0

"old" is what `mtp` ran with before mtp_dist/threads.py: no OpenMP variable set (torch's
libgomp: one thread per core, spin before sleeping at a barrier); "new" is the environment
`apply_thread_defaults` gives a process with none set. `--variant NAME:K=V,K=V` adds one (to try
other settings). The step is the tiny-cpu recipe's (configs/tiny-cpu.yaml: model, batch 8 x 128
tokens, AdamW, clipping) through the trainer's LocalEngine on a synthetic batch of its
vocabulary (4096); no data pipeline.

Each variant runs in a fresh subprocess, as OpenMP reads its environment once, when torch
loads it. "busy" starts `while True: pass` in another Python, pinned to the last usable core,
for that run only (it also stops by itself after --max-seconds + 120 s, should this script
die). Runs go alone, busy, alone, busy, ... per round so that machine noise hits all alike;
a run's step time is the median of its measured steps, a variant's the best of its rounds
(other jobs on a shared machine only ever slow a run down; the load average is printed); the
worst round is shown too, as collapse is what this measures. A run stops
measuring after --max-seconds (at least 3 steps): a collapsed variant is shown, not waited for.
Prints a table, then one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_dist.threads import apply_thread_defaults  # noqa: E402

# The settings the "old" run must not inherit from the shell running this benchmark.
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
            "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES")  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """One run: time the tiny-cpu training step; print one JSON object."""
    import torch

    from mtp_dist.config import load_config
    from mtp_dist.model import MTPModel
    from mtp_dist.training.engine import LocalEngine

    cfg = load_config("tiny-cpu")
    cfg.model.vocab_size = cfg.data.sp_vocab_size  # 4096, already a multiple of 64
    cfg.train.device = "cpu"
    torch.manual_seed(0)
    engine = LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)
    g = torch.Generator().manual_seed(0)
    window = cfg.data.seq_len + cfg.model.n_future
    batches = [
        torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, window), generator=g)
        for _ in range(4)
    ]
    times: list[float] = []
    for k in range(args.warmup + args.steps):
        start = time.perf_counter()
        engine.train_step([batches[k % len(batches)]])
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
            if len(times) >= 3 and sum(times) > args.max_seconds:
                break
    print(json.dumps({"step_s": times, "torch_threads": torch.get_num_threads()}))


def spinner(seconds: float) -> subprocess.Popen:
    """A process that keeps one core busy (the last usable one) for at most `seconds`."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    proc = subprocess.Popen([sys.executable, "-c", code])
    os.sched_setaffinity(proc.pid, {max(os.sched_getaffinity(0))})
    return proc


def run(env: dict[str, str], busy: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds)]  # fmt: skip
    hog = spinner(args.max_seconds + 120) if busy else None
    try:
        # Bounded: warm-up steps of a collapsed variant are not cut by --max-seconds.
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                             timeout=args.max_seconds + 300).stdout  # fmt: skip
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop measuring a run after this long (at least 3 steps)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    clean = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    new = dict(clean)
    apply_thread_defaults(new)
    variants = {"old": clean, "new": new}
    for spec in args.variant:
        name, _, pairs = spec.partition(":")
        variants[name] = {**clean, **dict(p.split("=", 1) for p in pairs.split(",") if p)}
    settings = {
        name: {k: v for k, v in env.items() if k in OMP_KEYS} for name, env in variants.items()
    }

    load_before = os.getloadavg()[0]
    steps: dict[tuple[str, str], list[float]] = {}
    threads: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, env in variants.items():
            for load in ("alone", "busy"):
                r = run(env, load == "busy", args)
                steps.setdefault((name, load), []).append(statistics.median(r["step_s"]))
                threads[name] = r["torch_threads"]

    load_after = os.getloadavg()[0]
    step_s = {key: min(v) for key, v in steps.items()}
    rows = {}
    print(f"{'variant':<10}{'threads':>8}{'alone step/s':>14}{'busy step/s':>13}"
          f"{'busy/alone':>12}{'worst alone':>13}{'worst busy':>12}  settings")  # fmt: skip
    for name in variants:
        alone, busy = 1 / step_s[(name, "alone")], 1 / step_s[(name, "busy")]
        rows[name] = {
            "settings": settings[name],
            "torch_threads": threads[name],
            "alone_steps_per_s": round(alone, 3),
            "busy_steps_per_s": round(busy, 3),
            "ratio_busy_vs_alone": round(busy / alone, 3),
        }
        shown = " ".join(f"{k}={v}" for k, v in settings[name].items()) or "(none)"
        worst = {load: 1 / max(steps[(name, load)]) for load in ("alone", "busy")}
        print(f"{name:<10}{threads[name]:>8}{alone:>14.2f}{busy:>13.2f}{busy / alone:>12.2f}"
              f"{worst['alone']:>13.2f}{worst['busy']:>12.2f}  {shown}")  # fmt: skip
    ratios = {
        f"ratio_{name}_vs_old_{load}": round(
            rows[name][f"{load}_steps_per_s"] / rows["old"][f"{load}_steps_per_s"], 3
        )
        for name in variants
        if name != "old"
        for load in ("alone", "busy")
    }
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}")
    result = {
        "cores": len(os.sched_getaffinity(0)),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "loadavg_before": round(load_before, 2),
        "loadavg_after": round(load_after, 2),
        "round_step_s": {f"{n}/{load}": [round(t, 4) for t in v] for (n, load), v in steps.items()},
        "variants": rows,
        **ratios,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
