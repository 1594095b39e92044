"""`mtp repro NAME`: run one reproduction study (mtp_dist/repro/studies.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAMES = ("n-code", "induction", "induction-random", "polynomials", "bytes")
MAX_DEFAULT_JOBS = 8
"""--jobs defaults to one run per usable core, at most this many (each run needs ~0.5-1 GB)."""


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def cmd_repro(args: argparse.Namespace) -> int:
    from .studies import STUDIES
    from .study import run_study, usable_cores

    jobs = min(usable_cores(), MAX_DEFAULT_JOBS) if args.jobs is None else args.jobs
    study = STUDIES[args.name]()
    out = Path(args.out or f"runs/repro/{args.name}{'-smoke' if args.smoke else ''}")
    docs = None if (args.smoke or args.no_docs) else Path(args.docs)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    summary = run_study(study, out, seeds=args.seeds, scale=args.scale, smoke=args.smoke,
                        mlflow=not args.no_mlflow, docs=docs, jobs=jobs, say=say)  # fmt: skip
    sys.stdout.write((out / "report.md").read_text())
    for v in summary["verdicts"]:
        say(f"{v['claim']}: {v['verdict']}")
    say(f"results: {out}/summary.json, {out}/report.md, {out}/plot.png")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("repro", help="reproduce one of the paper's small-scale findings")
    p.add_argument("name", choices=NAMES, help="the study")
    p.add_argument("--seeds", type=_count, default=3, help="seeds per variant (default 3)")
    p.add_argument("--scale", type=_positive, default=1.0, help="x training steps and corpus")
    p.add_argument(
        "--jobs",
        type=_count,
        help="runs trained at a time, sharing the cores "
        f"(default: one per usable core, at most {MAX_DEFAULT_JOBS})",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny run of every variant (~1 min)")
    p.add_argument("--out", help="output directory (default runs/repro/NAME)")
    p.add_argument("--docs", default="docs/reproductions.md", help="report section to update")
    p.add_argument("--no-docs", action="store_true", help="do not update --docs")
    p.add_argument("--no-mlflow", action="store_true", help="no MLflow parent/child runs")
    p.set_defaults(func=cmd_repro)
