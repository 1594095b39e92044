"""`mtp tokenizer train`: train the project's sentencepiece model on files.

    mtp tokenizer train --input /path/to/code --glob '**/*.py' --vocab-size 4096 --out run/tok

The lead's `mtp` parser calls `register(subparsers)`; every subcommand sets `func`, which the
top-level `main` calls with the parsed arguments (`args.func(args)`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import ConfigError


def _input_files(inputs: list[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob(pattern) if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"--input {item}: no such file or directory")
    return files


def train_checked(files: list[Path], out, vocab_size: int, setting: str, **kw):
    """`train_sentencepiece`, its refusals (too little text for the vocabulary, mostly) a
    ConfigError naming `setting`, the option that set the vocabulary size."""
    from .spm import train_sentencepiece

    try:
        return train_sentencepiece(files, out, vocab_size, **kw)
    except RuntimeError as err:
        # "INTERNAL: trainer_interface.cc(744) [check] Vocabulary size too high ...": the
        # words after the bracket are the user's part.
        why = str(err).strip().rsplit("] ", 1)[-1] or "no text to train on"
        raise ConfigError(f"{setting}: {why}") from err


def _cmd_train(args: argparse.Namespace) -> int:
    files = _input_files(args.input, args.glob)
    if not files:
        raise ConfigError(f"--input {' '.join(args.input)}: no files matching --glob {args.glob}")
    start = time.perf_counter()
    setting = f"--vocab-size {args.vocab_size}"
    tok = train_checked(files, args.out, args.vocab_size, setting, max_mb=args.max_mb)
    print(
        f"trained {tok!r} on {len(files)} files (at most {args.max_mb} MB) in "
        f"{time.perf_counter() - start:.1f}s -> {args.out} ({tok.identity()['sha256'][:12]})",
        file=sys.stderr,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tokenizer train` to a parent parser's subcommands."""
    tok = subparsers.add_parser("tokenizer", help="tokenizer tools")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece BPE model for code")
    train.add_argument("--input", nargs="+", required=True, help="directories and/or files")
    train.add_argument("--glob", default="**/*.py", help="file pattern inside directories")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size")
    train.add_argument("--out", required=True, help="output directory (tokenizer.json/.model)")
    train.add_argument("--max-mb", type=float, default=50.0, help="MB of text to train on")
    train.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m mtp_dist.tokenizers.cli tokenizer train ...`)."""
    parser = argparse.ArgumentParser(prog="mtp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
