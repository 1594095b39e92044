"""`mtp checkpoint consolidate RUN_OR_CKPT --out DIR`: one single-process checkpoint from a
distributed one (tensor-parallel shards joined, heads and pipeline stages collected)."""

from __future__ import annotations

import argparse


def cmd_consolidate(args: argparse.Namespace) -> int:
    from .shards import consolidate

    out = consolidate(args.source, args.out)
    print(f"wrote {out / 'model.pt'}")
    return 0


def register(subparsers) -> None:
    ckpt = subparsers.add_parser("checkpoint", help="checkpoint tools")
    sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    cons = sub.add_parser("consolidate", help="merge a distributed checkpoint into model.pt")
    cons.add_argument("source", help="checkpoint directory, or a run directory (its latest)")
    cons.add_argument("--out", required=True, help="directory for the single-process checkpoint")
    cons.set_defaults(func=cmd_consolidate)
