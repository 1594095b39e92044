"""Head-parallel output heads vs tensor-parallel-sharded heads: step time and peak memory.

    python bench/heads.py                 # n = 4 heads on 2 and 4 CPU ranks (gloo, float32)
    python bench/heads.py --ranks 2 --steps 3 --vocab 4096

For each rank count R, two layouts with the SAME tensor-parallel trunk (tensor = R):
  tp:   parallel.tensor=R            heads and the shared unembedding tensor-parallel
                                     (vocab-parallel logits + vocab_parallel_cross_entropy)
  head: parallel.tensor=R, head=R    each rank runs n/R whole heads, replicated unembedding;
                                     trunk-output and unembedding gradients all-reduced
Both run the production path (DistributedRuntime -> DeepSpeedTrainEngine, ZeRO 0, sequential
head loss). Step time: median over the timed steps of the slowest rank. Peak memory: on GPU
torch.cuda.max_memory_allocated; on CPU the growth of the process's peak RSS over its RSS
before the timed steps (what the steps themselves allocate; the peak is reset first), max over
ranks. Each layout runs in its own processes.
The last line printed is one JSON object with `ratio_head_parallel_vs_tp_step_time`
(head / tp, mean over rank counts; per rank count under `by_ranks`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so the peak read
    afterwards is the timed steps' own, not start-up's (model build, imports)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_overrides(args, run_dir: str) -> list[str]:
    """The model/data/train overrides of a rank benchmark (shared with sequence_parallel.py)."""
    return [
        f"run_dir={run_dir}",
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_attn_heads={args.attn_heads}",
        f"model.n_future={args.n_future}",
        f"model.n_layers={args.n_future + args.trunk_layers}",
        f"model.max_seq_len={args.seq_len}",
        f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}",
        "train.precision=fp32",
    ]


def add_run_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """The options `run_overrides` and `measure_rank` read; `defaults` per benchmark."""
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    for name in ("n_future", "trunk_layers", "d_model", "attn_heads", "vocab", "seq_len", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=defaults.get("steps", 5))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")


def _config(args, layout: str, ranks: int, run_dir: str):
    from mtp_dist.config import load_config

    parallel = [
        f"parallel.tensor={ranks}",
        f"parallel.head={ranks if layout == 'head' else 1}",
        "parallel.zero_stage=0",
    ]
    return load_config(None, run_overrides(args, run_dir) + parallel)


def measure_rank(rank: int, world: int, args, port: int, out: str, cfg_of, layout: str) -> None:
    """One spawned rank: build `layout`'s engine, warm up, time `args.steps` steps, record peak
    memory. One layout per process, so layouts do not share an allocator's leftovers."""
    from mtp_dist.distributed import LaunchEnv
    from mtp_dist.distributed.runtime import DistributedRuntime

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg_of(args, layout, world, tmp)
        runtime = DistributedRuntime(cfg, LaunchEnv(rank, world, rank, "127.0.0.1", port))
        engine = runtime.build_engine(cfg)
        g = torch.Generator().manual_seed(0)
        width = args.seq_len + args.n_future
        batch = torch.randint(0, args.vocab, (args.batch, width), generator=g)
        cuda = runtime.device.type == "cuda"
        for _ in range(args.warmup):
            engine.train_step([batch])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        base, times = _rss_mb(), []
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            engine.train_step([batch])
            dist.barrier()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - base
        stats = torch.tensor([peak, float(sum(p.numel() for p in engine.model.parameters()))])
        all_stats = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(all_stats, stats)
        results[layout] = {
            "step_time_s": statistics.median(times),
            "step_times_s": times,
            "peak_mem_mb_max_rank": max(float(s[0]) for s in all_stats),
            "params_per_rank": [int(s[1]) for s in all_stats],
            "memory_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss_growth",
        }
        del engine
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _run_rank(rank: int, world: int, args, port: int, out: str, layout: str) -> None:
    measure_rank(rank, world, args, port, out, _config, layout)


def spawn_layout(run_rank, world: int, args, layout: str) -> dict:
    """Run `layout` on `world` spawned ranks; rank 0's results.

    The ranks start with glibc's mmap threshold fixed at 64 KiB: by default it rises after
    large frees, large tensors then come from the heap and stay resident after they are
    freed, and RSS stops following what the step allocates (seen: a layout holding half the
    activations reported 10% MORE peak RSS growth)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        torch.multiprocessing.spawn(
            run_rank, args=(world, args, free_port(), out.name, layout), nprocs=world
        )
        return json.loads(Path(out.name).read_text())[layout]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, n_future=4, trunk_layers=2, d_model=256, attn_heads=8, vocab=8192,
                      seq_len=256, batch=4)  # fmt: skip
    args = parser.parse_args(argv)
    by_ranks = {}
    for world in args.ranks:
        res = {layout: spawn_layout(_run_rank, world, args, layout) for layout in ("tp", "head")}
        res["ratio_head_vs_tp_step_time"] = res["head"]["step_time_s"] / res["tp"]["step_time_s"]
        res["ratio_head_vs_tp_peak_mem"] = res["head"]["peak_mem_mb_max_rank"] / max(
            res["tp"]["peak_mem_mb_max_rank"], 1e-9
        )
        by_ranks[str(world)] = res
        print(
            f"ranks={world}: tp {res['tp']['step_time_s']:.3f} s/step, "
            f"{res['tp']['peak_mem_mb_max_rank']:.0f} MB | head {res['head']['step_time_s']:.3f} "
            f"s/step, {res['head']['peak_mem_mb_max_rank']:.0f} MB | ratio "
            f"{res['ratio_head_vs_tp_step_time']:.3f}",
            flush=True,
        )
    ratios = [r["ratio_head_vs_tp_step_time"] for r in by_ranks.values()]
    summary = {
        "ratio_head_parallel_vs_tp_step_time": sum(ratios) / len(ratios),
        "by_ranks": by_ranks,
        "config": vars(args),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
