"""`mtp import meta DIR --out RUN_DIR` (a model released in Meta's layout) and `mtp import hf DIR
--out RUN_DIR` (a Llama-family Hugging Face checkpoint, gaining multi-token heads, or a chained
model in GLM-4.5's layout with its modules): a run directory with one complete checkpoint, which
decodes, evaluates and trains (`--init-from`) like a native one (docs/interop.md)."""

from __future__ import annotations

import argparse


def cmd_import(args: argparse.Namespace) -> int:
    from .meta import import_meta

    ckpt = import_meta(args.source, args.out, max_seq_len=args.max_seq_len)
    print(f"wrote {ckpt}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from .hf_import import import_hf

    ckpt = import_hf(
        args.source,
        args.out,
        n_future=args.n_future,
        head_init=args.head_init,
        max_seq_len=args.max_seq_len,
    )
    print(f"wrote {ckpt}")
    from ..config import load_config

    train = f"mtp train heads-cpu --init-from {args.out} run_dir=RUN (its new heads only)"
    if load_config(ckpt / "config.yaml").model.chained:  # its modules are the checkpoint's
        train = f"mtp train RECIPE --init-from {args.out} with the model.* of {ckpt}/config.yaml"
    print(f"next: mtp generate --checkpoint {args.out} --prompt '...' --compare; {train}")
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
    hf = sub.add_parser(
        "hf",
        help="a Hugging Face checkpoint: Llama, Mistral, Qwen2 (plus heads) or a chained "
        "model in GLM-4.5's layout",
    )
    hf.add_argument("source", help="directory with config.json, *.safetensors, tokenizer.json")
    hf.add_argument("--out", required=True, help="new run directory (must not exist)")
    hf.add_argument(
        "--n-future",
        type=int,
        default=None,
        help="heads n: the checkpoint's last layer is head 1, n - 1 heads are added (default "
        "4); a GLM-4.5 (chained) checkpoint has its own",
    )
    hf.add_argument(
        "--head-init",
        choices=("copy", "random"),
        default=None,
        help="new heads: copies of the last layer (default) or freshly initialised",
    )
    hf.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="rotary table length, the longest context (default: max_position_embeddings)",
    )
    hf.set_defaults(func=cmd_import_hf)
