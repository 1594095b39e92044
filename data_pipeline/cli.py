"""`mtp data build`: pack a corpus into webdataset shards with a manifest; scaled out, with
`--part I/N` and `mtp data merge`; `mtp data tokenizer` trains the tokenizer on a bounded sample.

    mtp data build /path/to/code more.jsonl --out data/ --tokenizer run/tokenizer \
        --seq-len 128 --n-future 4 --include '**/*.py' --exclude '**/tests/**' --workers 2

    mtp data tokenizer /corpus --out tok --vocab-size 32000 --sample-mb 1000   # once
    mtp data build /corpus --out parts/3 --tokenizer tok ... --part 3/16       # 16 of these
    mtp data merge parts/* --out data                                          # then this

`register(subparsers)` is called by the `mtp` parser; the subcommand sets `func`, which the
top-level `main` calls with the parsed arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mtp_dist.config import ConfigError
from mtp_dist.tokenizers import ByteTokenizer, load_tokenizer

from .builder import DEFAULT_SHARD_BYTES, build_shards
from .sources import plan_tasks

DEFAULT_SAMPLE_MB = 200.0


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


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N, else ConfigError."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--part {text}: expected I/N with 0 <= I < N (e.g. 0/4)")
    return int(match[1]), int(match[2])


def _cmd_build(args: argparse.Namespace) -> int:
    include, exclude = tuple(args.include or ["**/*.py"]), tuple(args.exclude or [])
    part = parse_part(args.part) if args.part else None
    check_sources(args.sources, include, exclude, key="sources")
    tokenizer = ByteTokenizer() if args.bytes else load_tokenizer(args.tokenizer)
    options = dict(
        include=include,
        exclude=exclude,
        shard_bytes=int(args.shard_mb * 1_000_000),
        val_fraction=args.val_fraction,
        dedup=not args.no_dedup,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    what = (args.sources, args.out, tokenizer, args.seq_len, args.n_future)
    if part is not None:  # a part may hold no document; the merge judges the whole corpus
        from .parts import build_part

        build_part(*what, part=part, **options)
        return 0
    manifest = build_shards(*what, **options)
    if not manifest.totals["documents"]:
        raise ConfigError(f"sources: no usable document (see 'skipped' above); {args.out} is empty")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .parts import merge_parts

    manifest = merge_parts(args.parts, args.out, progress=not args.quiet)
    if not manifest.totals["documents"]:
        raise ConfigError(f"parts: no usable document (see 'skipped' above); {args.out} is empty")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from mtp_dist.tokenizers.cli import train_checked

    from .sample import SampleStats, sample_texts

    include, exclude = tuple(args.include or ["**/*.py"]), tuple(args.exclude or [])
    check_sources(args.sources, include, exclude, key="sources")
    if args.sample_mb <= 0:
        raise ConfigError(f"--sample-mb {args.sample_mb}: must be > 0")
    start, stats = time.perf_counter(), SampleStats()
    texts = sample_texts(
        args.sources, include, exclude, int(args.sample_mb * 1e6), seed=args.seed, stats=stats
    )
    setting = f"--vocab-size {args.vocab_size}"
    tok = train_checked(texts, args.out, args.vocab_size, setting)
    print(
        f"trained {tok!r} on a sample of {stats.units} of {stats.listed_units} files/ranges "
        f"({stats.unit_bytes / 1e6:.1f} of {stats.listed_bytes / 1e6:.1f} MB; {stats.documents} "
        f"documents, {stats.text_bytes / 1e6:.1f} MB of text) in "
        f"{time.perf_counter() - start:.1f}s -> {args.out} ({tok.identity()['sha256'][:12]})",
        file=sys.stderr,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data build`, `data merge` and `data tokenizer` to a parent parser's subcommands."""
    data = subparsers.add_parser("data", help="data pipeline tools")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("build", help="tokenize and pack a corpus into shards")
    p.add_argument("sources", nargs="+", help="directories, .jsonl files, plain text files")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument(
        "--tokenizer",
        help="directory of a saved tokenizer, or of a Hugging Face model's tokenizer files",
    )
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
    p.add_argument(
        "--part",
        metavar="I/N",
        help="tokenize only part I of N (0-based) into --out, for `mtp data merge`",
    )
    p.set_defaults(func=_cmd_build)

    m = sub.add_parser("merge", help="pack the parts of a build (--part I/N) into shards")
    m.add_argument("parts", nargs="+", help="the N part directories (any order)")
    m.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_merge)

    t = sub.add_parser("tokenizer", help="train the tokenizer on a bounded sample of a corpus")
    t.add_argument("sources", nargs="+", help="directories, .jsonl files, plain text files")
    t.add_argument("--out", required=True, help="output directory (tokenizer.json/.model)")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size")
    t.add_argument(
        "--sample-mb",
        type=float,
        default=DEFAULT_SAMPLE_MB,
        help="MB of the corpus to sample (files and 4 MB JSONL ranges, spread over all of it)",
    )
    t.add_argument("--include", action="append", help="glob in directories (repeatable)")
    t.add_argument("--exclude", action="append", help="glob to leave out (repeatable)")
    t.add_argument("--seed", type=int, default=0, help="seed of the sample")
    t.set_defaults(func=_cmd_tokenizer)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m data_pipeline.cli data build ...`)."""
    parser = argparse.ArgumentParser(prog="mtp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
