"""The two MTP families side by side at equal training time: parallel heads (the paper) and
chained modules (DeepSeek-V3 / GLM-4.5), parameter-matched and not.

    python bench/families.py                       # the default budget: tiny-cpu's 300 steps
    python bench/families.py --budget-s 120 --only parallel chained

The budget is the default recipe's own (configs/tiny-cpu.yaml: parallel, n = 4, parameter-
matched, its `train.max_steps`). Every variant trains for the same time, approximated by the
same training FLOPs (`mtp plan`'s count, mtp_dist/plan.py: steps = the recipe's steps x its
FLOPs per step / the variant's), because a time probe is only as good as the machine is quiet
(bench/recipes.py); `--probe` matches probed step times instead. Each run's measured training
seconds are reported beside it. Each variant has its own tokenizer and shards as a user's run
would. Each
checkpoint is then scored on held-out code (CPython's test suite: next-token bits per byte and
per-depth accuracy, mtp_dist.eval.quality) and decoded by bench/speculative.py twice: with
every head / module drafting (tokens per forward, acceptance, wall-clock speedup over plain
greedy at batch 1 and batch --batch) and with n_draft=auto (what a user gets: plain decoding
where drafting does not pay on this machine); both identical to greedy.

Variants (n = 4 each):
- parallel:           the paper's 4 heads, 3 trunk layers moved into heads (the default recipe);
- parallel-unmatched: 4 heads on the full trunk (3 extra layers);
- chained:            the next-token model plus 3 modules, 3 trunk layers moved into modules;
- chained-unmatched:  the full next-token model plus 3 modules.
Prints a line per variant, a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from recipes import RECIPE, score, step_seconds, train_variant

BENCH = Path(__file__).resolve().parent
VARIANTS: dict[str, list[str]] = {
    "parallel": [],
    "parallel-unmatched": ["model.parameter_matched=false"],
    "chained": ["model.mtp_arch=chained"],
    "chained-unmatched": ["model.mtp_arch=chained", "model.parameter_matched=false"],
}


def recipe_steps() -> int:
    from mtp_dist.config import load_config

    return load_config(RECIPE, ["run_dir=/tmp/unused"]).train.max_steps


def step_flops(overrides: list[str]) -> float:
    """Training FLOPs of one optimizer step of the variant, as `mtp plan` counts them."""
    from mtp_dist.checkpoint import padded_vocab
    from mtp_dist.config import load_config
    from mtp_dist.plan import flops_per_token
    from mtp_dist.plan_params import param_counts

    cfg = load_config(RECIPE, [*overrides, "run_dir=/tmp/unused"])
    cfg.model.vocab_size = padded_vocab(cfg.data.sp_vocab_size)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    return flops_per_token(cfg, param_counts(cfg))["model"] * tokens


def speculative(run_dir: Path, batch: int, prompts: int, max_tokens: int, n_draft: str) -> dict:
    """bench/speculative.py on the checkpoint: its last line, one JSON object."""
    cmd = [sys.executable, str(BENCH / "speculative.py"), "--checkpoint", str(run_dir),
           "--batch", str(batch), "--prompts", str(prompts), "--max-tokens", str(max_tokens),
           "--n-draft", n_draft, "--no-mlflow"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench/speculative.py failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--probe", action="store_true", help="match probed step times, not FLOPs (quiet machine)"
    )
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants to run")
    p.add_argument("--limit", type=int, default=20, help="held-out files scored")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched decoding")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts decoded")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--out", default="/tmp/mtp-families", help="run directories")
    p.add_argument(
        "--reuse", action="store_true", help="score and decode the runs already in --out"
    )
    args = p.parse_args()
    cost = step_seconds if args.probe else step_flops
    costs = {
        name: cost(VARIANTS[name], *([args.threads] if args.probe else [])) for name in VARIANTS
    }
    base_steps = recipe_steps()
    print(
        f"budget: {base_steps} steps of the default recipe, by {'time' if args.probe else 'FLOPs'}"
    )
    rows = []
    for name in args.only or list(VARIANTS):
        overrides = VARIANTS[name]
        steps = max(20, round(base_steps * costs["parallel"] / costs[name]))
        run_dir = Path(args.out) / name
        if args.reuse:
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            trained = sum(r["tokens"] / r["tokens_per_s"] for r in records), float("nan")
        else:
            trained = train_variant(run_dir, overrides, steps)
        if trained is None:
            continue
        train_s, wall = trained
        q = score(run_dir, args.limit)
        # Every module / head drafting: what the family's drafts are worth (tokens per
        # forward); n_draft=auto: what a user gets here (plain decoding where drafting loses).
        full = speculative(run_dir, args.batch, args.prompts, args.max_tokens, "3")
        auto = speculative(run_dir, args.batch, args.prompts, args.max_tokens, "auto")
        rows.append({
            "name": name, "overrides": overrides, "steps": steps,
            "step_cost_vs_default": costs[name] / costs["parallel"],
            "train_s": train_s, "wall_s": wall,
            "bits_per_byte": q["bits_per_byte"], "head_accuracy": q["head_accuracy"],
            "tokens_per_forward": full["tokens_per_forward"],
            "acceptance_rate": full["acceptance_rate"],
            "speedup_batch1": full["speedup"], "speedup_batched": full["batched"]["speedup"],
            "auto_speedup_batch1": auto["speedup"],
            "auto_speedup_batched": auto["batched"]["speedup"],
            "identical_to_greedy": full["identical_to_greedy"] and auto["identical_to_greedy"],
        })  # fmt: skip
        r = rows[-1]
        print(f"{name}: {steps} steps, train {train_s:.0f} s, bits/byte {r['bits_per_byte']:.3f}, "
              f"{r['tokens_per_forward']:.2f} tokens/forward, all drafts "
              f"{r['speedup_batch1']:.2f}x (batch {args.batch}: {r['speedup_batched']:.2f}x), "
              f"auto {r['auto_speedup_batch1']:.2f}x (batch {args.batch}: "
              f"{r['auto_speedup_batched']:.2f}x)", flush=True)  # fmt: skip
    b = f"b{args.batch}"
    print(f"\n{'variant':<20}{'steps':>7}{'train s':>9}{'bits/B':>8}{'tok/fwd':>9}"
          f"{'all b1':>8}{'all ' + b:>8}{'auto b1':>9}{'auto ' + b:>9}  acc d1..d4")  # fmt: skip
    for r in rows:
        acc = " ".join(f"{a:.2f}" for a in r["head_accuracy"])
        print(f"{r['name']:<20}{r['steps']:>7}{r['train_s']:>9.0f}{r['bits_per_byte']:>8.3f}"
              f"{r['tokens_per_forward']:>9.2f}{r['speedup_batch1']:>7.2f}x"
              f"{r['speedup_batched']:>7.2f}x{r['auto_speedup_batch1']:>8.2f}x"
              f"{r['auto_speedup_batched']:>8.2f}x  {acc}")  # fmt: skip
    print(json.dumps({"budget_steps": base_steps, "matched_by": "time" if args.probe else "flops",
                      "limit": args.limit, "batch": args.batch, "variants": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
