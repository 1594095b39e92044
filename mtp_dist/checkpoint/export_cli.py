"""`mtp export {hf,meta} CHECKPOINT OUT`: a single-process checkpoint in another format
(docs/interop.md)."""

from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    if args.export_command == "hf":
        from .hf import export_hf as export
    else:
        from .meta import export_meta as export
    out = export(args.checkpoint, args.out)
    print(f"wrote {out}")
    if args.export_command == "hf":
        from ..config import load_config
        from .hf import engine_notes
        from .layout import resolve_checkpoint

        model = load_config(resolve_checkpoint(args.checkpoint) / "config.yaml").model
        for note in engine_notes(model):
            print(f"mtp export: note: {note}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="write a checkpoint in another format")
    sub = export.add_subparsers(dest="export_command", required=True)
    helps = {
        "hf": "transformers LlamaForCausalLM directory (next-token model; heads 2..n beside it); "
        "a chained model: Glm4MoeForCausalLM with its MTP layers (GLM-4.5's layout)",
        "meta": "Meta's multi-token-prediction layout (params.json, consolidated.00.pth)",
    }
    for name, text in helps.items():
        fmt = sub.add_parser(name, help=text)
        fmt.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest)")
        fmt.add_argument("out", help="new (or empty) output directory")
        fmt.set_defaults(func=cmd_export)
