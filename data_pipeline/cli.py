"""`mtp data build`: pack a corpus into webdataset shards with a manifest.

    mtp data build /path/to/code more.jsonl --out data/ --tokenizer run/tokenizer \
        --seq-len 128 --n-future 4 --include '**/*.py' --exclude '**/tests/**' --workers 2

`register(subparsers)` is called by the `mtp` parser; the subcommand sets `func`, which the
top-level `main` calls with the parsed arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mtp_dist.config import ConfigError
from mtp_dist.tokenizers import ByteTokenizer, load_tokenizer

from .builder import DEFAULT_SHARD_BYTES, build_shards
from .sources import plan_tasks


def check_sources(
    sources: Sequence[str], include: Sequence[str], exclude: Sequence[str], key: str = "source"
) -> None:
    """Every source exists and together they hold a non-empty file to read, else ConfigError.

    `build_shards` records a missing source under 'skipped' and packs an empty corpus; a command
    the user points at these sources refuses them instead, before it writes anything.
    """
    for source in sources:
        if not Path(source).exists():
            raise ConfigError(f"{key}={source}: does not exist")
    tasks, _, _ = plan_tasks(sources, include, exclude)
    where = f"{key}={' '.join(map(str, sources))}"
    if not tasks:
        patterns = " ".join(include)
        excluded = f" (excluding {' '.join(exclude)})" if exclude else ""
        raise ConfigError(f"{where}: no files matching {patterns}{excluded}")
    if not any(t.size for t in tasks):
        raise ConfigError(f"{where}: the {len(tasks)} matching files are all empty")


def _cmd_build(args: argparse.Namespace) -> int:
    include, exclude = tuple(args.include or ["**/*.py"]), tuple(args.exclude or [])
    check_sources(args.sources, include, exclude, key="sources")
    tokenizer = ByteTokenizer() if args.bytes else load_tokenizer(args.tokenizer)
    manifest = build_shards(
        args.sources,
        args.out,
        tokenizer,
        args.seq_len,
        args.n_future,
        include=include,
        exclude=exclude,
        shard_bytes=int(args.shard_mb * 1_000_000),
        val_fraction=args.val_fraction,
        dedup=not args.no_dedup,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    if not manifest.totals["documents"]:
        raise ConfigError(f"sources: no usable document (see 'skipped' above); {args.out} is empty")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data build` to a parent parser's subcommands."""
    data = subparsers.add_parser("data", help="data pipeline tools")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("build", help="tokenize and pack a corpus into shards")
    p.add_argument("sources", nargs="+", help="directories, .jsonl files, plain text files")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="directory of a saved tokenizer (tokenizer.json)")
    tok.add_argument("--bytes", action="store_true", help="use the byte tokenizer")
    p.add_argument("--seq-len", type=int, required=True, help="trunk context in tokens")
    p.add_argument("--n-future", type=int, required=True, help="number of output heads")
    p.add_argument("--include", action="append", help="glob in directories (repeatable)")
    p.add_argument("--exclude", action="append", help="glob to leave out (repeatable)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--val-fraction", type=float, default=0.02, help="documents held out")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 1e6, help="shard size")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the doc shuffle")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m data_pipeline.cli data build ...`)."""
    parser = argparse.ArgumentParser(prog="mtp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
