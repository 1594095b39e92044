"""Tokenizers: the `Tokenizer` interface, byte and sentencepiece implementations, and loading.

tok = build_tokenizer("bytes", None)                 # or ("sentencepiece", "run/tokenizer")
tok.save("run/tokenizer"); tok = load_tokenizer("run/tokenizer")
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import TOKENIZER_JSON, Tokenizer, TokenizerError
from .byte import ByteTokenizer
from .spm import SentencePieceTokenizer, train_sentencepiece


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read what `Tokenizer.save()` wrote; a model file that changed since is an error."""
    directory = Path(directory)
    meta_path = directory / TOKENIZER_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_JSON} in tokenizer directory {str(directory)!r}")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        tok = SentencePieceTokenizer(directory / meta["model_file"])
        if tok.identity()["sha256"] != meta["sha256"]:
            raise TokenizerError(
                f"{directory / meta['model_file']}: sha256 differs from {meta_path} "
                "(the model file was replaced after saving)"
            )
        return tok
    raise TokenizerError(f"{meta_path}: unknown tokenizer kind {kind!r}")


def build_tokenizer(kind: str, model_path: str | Path | None) -> Tokenizer:
    """'bytes' (model_path unused) or 'sentencepiece' (a .model file or a saved directory)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if model_path is None:
            raise TokenizerError(
                "sentencepiece tokenizer needs a model path (.model file or directory)"
            )
        path = Path(model_path)
        if path.is_dir():
            return load_tokenizer(path)
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected 'bytes' or 'sentencepiece'")


__all__ = [
    "TOKENIZER_JSON",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "load_tokenizer",
    "train_sentencepiece",
]
