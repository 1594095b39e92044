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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads import measure_rank, spawn_layout  # noqa: E402  (bench/heads.py)


def _config(args, layout: str, ranks: int, run_dir: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mtp_dist.config import load_config

    over = [
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
        f"parallel.tensor={ranks}",
        f"parallel.sequence_parallel={layout == 'sp'}",
        "parallel.zero_stage=0",
    ]
    return load_config(None, over)


def _run_rank(rank: int, world: int, args, port: int, out: str, layout: str) -> None:
    measure_rank(rank, world, args, port, out, _config, layout)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--n-future", type=int, default=1)
    parser.add_argument("--trunk-layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--attn-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
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
