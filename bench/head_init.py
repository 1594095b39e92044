"""New heads on a pretrained model: copies of its last layer or freshly initialised layers?

    python bench/head_init.py [--base-steps 300] [--steps 150] [--n-future 4]

One run, side by side: a next-token model (the tiny-cpu recipe's shape with n_future 1) is
trained on the standard library, exported with `mtp export hf`, and imported twice with
`mtp import hf --n-future N`: `--head-init copy` and `--head-init random`. Each import then
trains its new heads for --steps steps under one budget (recipe heads-cpu: the next-token model
frozen, the same data, seed and learning rate). Reported for each: the per-head validation loss
after every --eval-every steps (from the trainer), and tokens per forward of self-speculative
decoding (n_draft all heads) on 16 held-out prompts (CPython's test files, which the training
corpus leaves out), at import and after training. A table, then one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculative import held_out_files, held_out_prompts  # noqa: E402

from mtp_dist.checkpoint import load_for_inference  # noqa: E402
from mtp_dist.cli import main as mtp  # noqa: E402
from mtp_dist.inference import Decoder  # noqa: E402


def run(*argv: str) -> str:
    """`mtp ARGV` in this process; its stdout (a failure exits with its stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mtp(list(argv))
    if code:
        sys.exit(f"mtp {' '.join(argv)} failed ({code}): {err.getvalue()[-2000:]}")
    return out.getvalue()


def tokens_per_forward(run_dir: Path, prompts: int = 16) -> float:
    model, tok = load_for_inference(run_dir)
    ids = held_out_prompts(tok, held_out_files(None), prompts, 64)[:prompts]
    decoder = Decoder(model, vocab_limit=tok.vocab_size)
    return decoder.run(ids, max_new_tokens=64, speculative=True).stats.tokens_per_forward


def validation(stdout: str) -> list[tuple[int, list[float]]]:
    """(step, per-head validation loss) from the trainer's lines
    'step K: validation loss per head 4.674 5.302 ...' (3 decimals, as the table shows them)."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("step ") and ": validation loss per head " in line:
            step, losses = line.split(": validation loss per head ")
            rows.append((int(step.split()[-1]), [float(x) for x in losses.split()]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--n-future", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        run("train", "tiny-cpu", f"run_dir={tmp / 'base'}", "model.n_future=1",
            f"train.max_steps={args.base_steps}", "train.eval_every=0",
            f"train.ckpt_every={args.base_steps}", "tracking.enabled=false")  # fmt: skip
        base_seconds = time.perf_counter() - started
        run("export", "hf", str(tmp / "base"), str(tmp / "hf"))
        results = {}
        for init in ("copy", "random"):
            imported = tmp / f"import-{init}"
            run("import", "hf", str(tmp / "hf"), "--out", str(imported),
                "--n-future", str(args.n_future), "--head-init", init)  # fmt: skip
            at_import = tokens_per_forward(imported)
            started = time.perf_counter()
            out = run("train", "heads-cpu", "--init-from", str(imported),
                      f"run_dir={tmp / f'heads-{init}'}", f"train.max_steps={args.steps}",
                      f"train.eval_every={args.eval_every}", f"train.ckpt_every={args.steps}",
                      "tracking.enabled=false")  # fmt: skip
            results[init] = {
                "tokens_per_forward_at_import": round(at_import, 4),
                "tokens_per_forward": round(tokens_per_forward(tmp / f"heads-{init}"), 4),
                "validation": [
                    {"step": s, "head_losses": [round(x, 4) for x in v]} for s, v in validation(out)
                ],
                "train_seconds": round(time.perf_counter() - started, 1),
            }
    print(
        f"base: tiny-cpu shape, n_future 1, {args.base_steps} steps ({base_seconds:.0f} s); "
        f"heads: n_future {args.n_future}, {args.steps} steps, train.freeze=trunk_and_head1"
    )
    print(f"{'init':>7} {'step':>5}  validation loss per head")
    for init, r in results.items():
        for row in r["validation"]:
            print(f"{init:>7} {row['step']:>5}  {' '.join(f'{x:.3f}' for x in row['head_losses'])}")
    print(f"{'init':>7}  tokens/forward at import -> after {args.steps} steps")
    for init, r in results.items():
        print(
            f"{init:>7}  {r['tokens_per_forward_at_import']:.3f} -> {r['tokens_per_forward']:.3f}"
        )
    print(json.dumps({"base_steps": args.base_steps, "steps": args.steps, **results}))


if __name__ == "__main__":
    main()
