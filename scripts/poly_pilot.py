"""Pilot one polynomial-arithmetic configuration: train n = 1 and print exact accuracy per
operation count, plus teacher-forced accuracy on the answer's tokens.

This is how a candidate default for `mtp repro polynomials` is tried before a whole study is
spent on it (docs/reproductions.md, the polynomials section, records the pilots):

    OMP_NUM_THREADS=1 python scripts/poly_pilot.py OUT --notation dense --steps 4000 \
        model.d_model=96 train.lr=2e-3

The training overrides start from the study's own (mtp_dist/repro/studies.py) and any given
after OUT replace them. OUT is resumed if it holds a run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PER_OPS = 30
"""Problems per operation count, as the study measures (mtp_dist/repro/studies.py)."""


def teacher_forced(model, tok, pairs, notation: str) -> tuple[float, float]:
    """(share of answer tokens the model predicts right given the true prefix, share of answers
    right in every token): tells "learnt the structure" from "learnt the arithmetic"."""
    import torch

    right = total = exact = 0
    for q, a in pairs:
        ids = [tok.eos_id, *tok.encode(q + a + "\n")]
        start, length = 1 + len(tok.encode(q)), len(tok.encode(a))
        with torch.no_grad():
            pred = model.next_token_logits(torch.tensor([ids]))[0].argmax(-1)
        ok = [int(pred[i - 1]) == ids[i] for i in range(start, start + length)]
        right, total, exact = right + sum(ok), total + len(ok), exact + all(ok)
    return right / total, exact / len(pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--notation", choices=("sparse", "dense"), default="sparse")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--problems", type=int, default=150_000)
    p.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    args = p.parse_intermixed_args()

    import torch

    from mtp_dist.config import ConfigError, load_config
    from mtp_dist.inference.generate import GenerationConfig, Generator
    from mtp_dist.repro import polynomials as pl
    from mtp_dist.repro import studies
    from mtp_dist.training import Trainer

    torch.set_num_threads(1)
    corpus = args.out / "corpus"
    if not (corpus / "polynomials.jsonl").is_file():
        pairs = pl.problems(11, args.problems, studies.IN_DOMAIN, args.notation)
        studies._write_jsonl(corpus / "polynomials.jsonl", (q + a + "\n" for q, a in pairs))
    overrides = [
        *studies.polynomial_arithmetic().base, "model.n_future=1", *args.overrides,
        f"data.source={corpus}", "data.include=['**/*.jsonl']", "train.seed=0",
        f"train.max_steps={args.steps}", f"train.ckpt_every={args.steps}",
        f"train.eval_every={max(1, args.steps // 4)}",
        f"train.warmup_steps={max(2, args.steps // 15)}",
        "tracking.enabled=false", f"run_dir={args.out / 'run'}",
    ]  # fmt: skip
    try:
        cfg = load_config("tiny-cpu", overrides)
    except ConfigError as e:
        print(f"poly_pilot: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    Trainer(cfg, resume=True).fit()
    seconds = time.monotonic() - started
    model, tok = studies._load(args.out / "run")
    gen = Generator(model, tok)
    exact, forced = {}, {}
    print("ops  exact  answer tokens (teacher-forced)")
    for ops in range(1, 11):
        pairs = pl.problems(studies.EVAL_SEED, PER_OPS, range(ops, ops + 1), args.notation)
        config = GenerationConfig(max_tokens=32, stop=("\n",), batch_size=32)
        completions, _ = gen.generate([q for q, _ in pairs], config)
        exact[ops] = sum(
            pl.parse(c.text, args.notation) == pl.parse(a, args.notation)
            for c, (_, a) in zip(completions, pairs)
        ) / len(pairs)  # fmt: skip
        forced[ops] = teacher_forced(model, tok, pairs, args.notation)[0]
        print(f"{ops:>3}  {exact[ops]:.3f}  {forced[ops]:.3f}")
    result = {
        "notation": args.notation,
        "steps": args.steps,
        "train_seconds": round(seconds, 1),
        "acc_in_domain": sum(exact[k] for k in range(1, 6)) / 5,
        "acc_out_of_domain": sum(exact[k] for k in range(6, 11)) / 5,
        "exact_by_ops": exact,
        "answer_token_acc_by_ops": forced,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # spawn-started data workers import this file: keep work in main()
    sys.exit(main())
