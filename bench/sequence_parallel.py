"""Sequence parallelism vs plain tensor parallelism: step time and peak memory per rank.

    python bench/sequence_parallel.py               # tensor = 2 and 4 CPU ranks (gloo, float32)
    python bench/sequence_parallel.py --ranks 2 --seq-len 2048

For each rank count R, two layouts of the same model, both parallel.tensor=R, ZeRO 0:
  tp:  residual stream and norms replicated on every tensor rank (all-reduce after row layers)
  sp:  parallel.sequence_parallel=true: they hold T / R of the sequence (reduce-scatter after
       row layers and the embedding, all-gather after each norm)
Long sequence, small vocabulary and n = 1 so that trunk activations, which sequence parallelism
shrinks, dominate the step's memory. Step time: median over the timed steps of the slowest rank.
Peak memory: on GPU torch.cuda.max_memory_allocated; on CPU the growth of peak RSS over RSS
before the timed steps (peak reset first), max over ranks. Each layout in its own processes.
The last line printed is one JSON object with `ratio_sp_vs_tp_peak_mem` and
`ratio_sp_vs_tp_step_time` (sp / tp, mean over rank counts; per rank count under `by_ranks`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/heads.py: shared rank harness
from heads import add_run_arguments, measure_rank, run_overrides, spawn_layout  # noqa: E402


def _config(args, layout: str, ranks: int, run_dir: str):
    from mtp_dist.config import load_config

    parallel = [
        f"parallel.tensor={ranks}",
        f"parallel.sequence_parallel={layout == 'sp'}",
        "parallel.zero_stage=0",
    ]
    return load_config(None, run_overrides(args, run_dir) + parallel)


def _run_rank(rank: int, world: int, args, port: int, out: str, layout: str) -> None:
    measure_rank(rank, world, args, port, out, _config, layout)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, n_future=1, trunk_layers=4, d_model=256, attn_heads=8, vocab=1024,
                      seq_len=2048, batch=2, steps=3)  # fmt: skip
    args = parser.parse_args(argv)
    by_ranks = {}
    for world in args.ranks:
        res = {layout: spawn_layout(_run_rank, world, args, layout) for layout in ("tp", "sp")}
        tp, sp = res["tp"], res["sp"]
        res["ratio_sp_vs_tp_step_time"] = sp["step_time_s"] / tp["step_time_s"]
        res["ratio_sp_vs_tp_peak_mem"] = sp["peak_mem_mb_max_rank"] / tp["peak_mem_mb_max_rank"]
        by_ranks[str(world)] = res
        print(
            f"ranks={world}: tp {tp['step_time_s']:.3f} s/step, {tp['peak_mem_mb_max_rank']:.0f}"
            f" MB | sp {sp['step_time_s']:.3f} s/step, {sp['peak_mem_mb_max_rank']:.0f} MB | "
            f"sp/tp time {res['ratio_sp_vs_tp_step_time']:.3f}, "
            f"memory {res['ratio_sp_vs_tp_peak_mem']:.3f}",
            flush=True,
        )

    def mean(key: str) -> float:
        return sum(r[key] for r in by_ranks.values()) / len(by_ranks)

    summary = {
        "ratio_sp_vs_tp_peak_mem": mean("ratio_sp_vs_tp_peak_mem"),
        "ratio_sp_vs_tp_step_time": mean("ratio_sp_vs_tp_step_time"),
        "by_ranks": by_ranks,
        "config": vars(args),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
