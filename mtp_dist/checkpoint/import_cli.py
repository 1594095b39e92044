"""`mtp import meta DIR --out RUN_DIR`: a model released in Meta's layout as a run directory with
one complete checkpoint, which decodes, evaluates and trains (`--init-from`) like a native one
(docs/interop.md)."""

from __future__ import annotations

import argparse


def cmd_import(args: argparse.Namespace) -> int:
    from .meta import import_meta

    ckpt = import_meta(args.source, args.out, max_seq_len=args.max_seq_len)
    print(f"wrote {ckpt}")
    return 0


def register(subparsers) -> None:
    imp = subparsers.add_parser("import", help="read a model from another format")
    sub = imp.add_subparsers(dest="import_command", required=True)
    meta = sub.add_parser("meta", help="Meta's layout (params.json, consolidated.00.pth)")
    meta.add_argument("source", help="directory with params.json, consolidated.00.pth, tokenizer")
    meta.add_argument("--out", required=True, help="new run directory")
    meta.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="rotary table length, the longest context (default 4096, Llama-2's)",
    )
    meta.set_defaults(func=cmd_import)
