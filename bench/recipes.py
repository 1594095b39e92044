"""Recipe variants under one training budget, scored on held-out code, side by side.

    python bench/recipes.py --budget-s 300 --base-step-s 0.65 [--only base vocab2k ...]

For each variant (overrides on configs/tiny-cpu.yaml, all n = 4) `train.max_steps` is set so
that training takes about the budget. The step time: with `--base-step-s S` (the base recipe's
measured seconds per step on a quiet machine), S times the variant's training FLOPs per step
over the base's (bench/throughput.py's count), i.e. FLOP-matched budgets, which time-matched
ones approximate (per-operation overhead differs between shapes); without it, a timing probe of
a few optimizer steps, reliable only on a quiet machine (another process's load during the probe
distorts it: seen here as 24 and 130 steps instead of ~500). Then `mtp train` runs the variant
(its own tokenizer and shards under --out/NAME, as a user's run would), and the checkpoint is
scored by mtp_dist.eval.quality on the first --limit files of CPython's test suite (head-1 bits
per byte, per-head accuracy) next to gzip -9 on the same files. Prints a line per variant, a
table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny-cpu.yaml"
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "lr2e-3": ["train.lr=2e-3"],
    "batch16": ["train.micro_batch_size=16", "train.lr=2e-3"],
    "seq256": ["data.seq_len=256", "train.micro_batch_size=4", "train.lr=2e-3"],
    "vocab2k": ["data.sp_vocab_size=2048", "train.lr=2e-3"],
    "d192": ["model.d_model=192", "model.n_attn_heads=3", "train.lr=2e-3"],
    "deeper": ["model.n_layers=8", "train.lr=2e-3"],
}
FIXED = ["tracking.enabled=false", "train.eval_every=0", "train.log_every=50"]


def step_seconds(overrides: list[str], threads: int, steps: int = 6) -> float:
    """Fastest optimizer-step time of this variant's shape on random tokens (LocalEngine): the
    minimum, not the median, because a burst of load from another process during the probe
    would otherwise cut a variant's steps (seen: 24 steps instead of ~500)."""
    from mtp_dist.checkpoint import padded_vocab
    from mtp_dist.config import load_config
    from mtp_dist.model import MTPModel
    from mtp_dist.training import LocalEngine

    torch.set_num_threads(threads)
    cfg = load_config(RECIPE, [*overrides, "run_dir=/tmp/unused", "train.device=cpu"])
    cfg.model.vocab_size = padded_vocab(cfg.data.sp_vocab_size)
    torch.manual_seed(0)
    engine = LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)
    width = cfg.data.seq_len + cfg.model.n_future
    shape = (cfg.train.micro_batch_size, width)
    times = []
    for k in range(steps + 2):
        batch = torch.randint(0, cfg.data.sp_vocab_size, shape)
        start = time.perf_counter()
        engine.train_step([batch])
        if k >= 2:
            times.append(time.perf_counter() - start)
    return min(times)


def step_flops(overrides: list[str]) -> float:
    """Training FLOPs of one optimizer step of this variant (bench/throughput.py's count)."""
    from throughput import flops_per_token

    from mtp_dist.checkpoint import padded_vocab
    from mtp_dist.config import load_config

    cfg = load_config(RECIPE, [*overrides, "run_dir=/tmp/unused"])
    cfg.model.vocab_size = padded_vocab(cfg.data.sp_vocab_size)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    return flops_per_token(cfg.model, cfg.data.seq_len) * tokens


def train_variant(run_dir: Path, overrides: list[str], steps: int) -> tuple[float, float] | None:
    """`mtp train` the recipe with `overrides` for `steps` into run_dir, as a user's run would
    (its own tokenizer and shards). (training seconds from its metrics, wall seconds), or None
    after printing why it failed."""
    cmd = [sys.executable, "-m", "mtp_dist.cli", "train", str(RECIPE), *FIXED, *overrides,
           f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
           f"train.warmup_steps={max(10, steps // 15)}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"{run_dir.name}: training failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["tokens"] / r["tokens_per_s"] for r in records), wall


def score(run_dir: Path, limit: int) -> dict:
    from mtp_dist.checkpoint import load_for_inference, resolve_checkpoint
    from mtp_dist.config import load_config
    from mtp_dist.eval.quality import HELD_OUT, evaluate, select_files

    torch.set_num_threads(1)
    ckpt = resolve_checkpoint(run_dir)
    model, tokenizer = load_for_inference(ckpt)
    context = load_config(ckpt / "config.yaml").data.seq_len
    files, _ = select_files(HELD_OUT, limit, tokenizer)
    return evaluate(files, model, tokenizer, context=context)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per variant")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants to run")
    p.add_argument("--limit", type=int, default=20, help="held-out files scored")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--out", default="/tmp/mtp-recipes", help="run directories")
    p.add_argument(
        "--base-step-s", type=float, help="the base recipe's seconds per step: FLOP-scaled steps"
    )
    args = p.parse_args()
    rows = []
    for name in args.only or list(VARIANTS):
        overrides = VARIANTS[name]
        if args.base_step_s:
            step_s = args.base_step_s * step_flops(overrides) / step_flops([])
        else:
            step_s = step_seconds(overrides, args.threads)
        steps = max(20, int(args.budget_s / step_s))
        run_dir = Path(args.out) / name
        trained = train_variant(run_dir, overrides, steps)
        if trained is None:
            continue
        train_s, wall = trained
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        q = score(run_dir, args.limit)
        # The quality report's own `tokens` are the held-out tokens scored; training's differ.
        rows.append({**q, "name": name, "overrides": overrides, "steps": steps,
                     "train_tokens": sum(r["tokens"] for r in records), "probe_step_s": step_s,
                     "train_s": train_s, "wall_s": wall})  # fmt: skip
        r = rows[-1]
        print(f"{name}: {steps} steps, {r['train_tokens']:,} tokens, train {train_s:.0f} s "
              f"(wall {wall:.0f} s), bits/byte {r['bits_per_byte']:.3f} (gzip "
              f"{r['gzip_bits_per_byte']:.3f})", flush=True)  # fmt: skip
    print(f"\n{'variant':<10}{'steps':>7}{'tokens':>11}{'train s':>9}{'bits/B':>8}{'gzip':>7}"
          f"{'acc h1..h4':>26}")  # fmt: skip
    for r in rows:
        acc = " ".join(f"{a:.2f}" for a in r["head_accuracy"])
        print(f"{r['name']:<10}{r['steps']:>7}{r['train_tokens']:>11,}{r['train_s']:>9.0f}"
              f"{r['bits_per_byte']:>8.3f}{r['gzip_bits_per_byte']:>7.3f}{acc:>26}")  # fmt: skip
    print(json.dumps({"budget_s": args.budget_s, "limit": args.limit, "variants": rows}))


if __name__ == "__main__":
    main()
