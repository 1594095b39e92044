"""Tokenizers: the `Tokenizer` interface, byte, sentencepiece and Hugging Face (a checkpoint's
own tokenizer.json) implementations, and loading.

tok = build_tokenizer("bytes", None)                 # or ("sentencepiece", "run/tokenizer")
tok = build_tokenizer("hf", "Llama-3.2-1B")          # a model directory (or a saved "hf" one)
tok.save("run/tokenizer"); tok = load_tokenizer("run/tokenizer")
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import TOKENIZER_JSON, Tokenizer, TokenizerError
from .byte import ByteTokenizer
from .pretrained import PretrainedTokenizer
from .spm import SentencePieceTokenizer, train_sentencepiece


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read what `Tokenizer.save()` wrote; a model file that changed since is an error.

    A Hugging Face tokenizer directory (a model's: its tokenizer.json is HF's, not our metadata)
    is read as kind "hf" too, so `mtp data build --tokenizer MODEL_DIR` works.
    """
    directory = Path(directory)
    meta_path = directory / TOKENIZER_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_JSON} in tokenizer directory {str(directory)!r}")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{meta_path}: not JSON ({err})") from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind is None and isinstance(meta, dict) and "model" in meta:  # HF's own tokenizer.json
        return PretrainedTokenizer.from_model_dir(directory)
    if kind == "hf":
        return PretrainedTokenizer.load(directory, meta)
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
    """'bytes' (model_path unused), 'sentencepiece' (a .model file or a saved directory) or 'hf'
    (a directory holding Hugging Face tokenizer files, e.g. a model's, or a saved 'hf' one)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        if model_path is None:
            raise TokenizerError(
                "hf tokenizer needs a directory (tokenizer.json + tokenizer_config.json)"
            )
        path = Path(model_path)
        if not (path / TOKENIZER_JSON).is_file():
            return PretrainedTokenizer.from_model_dir(path)  # its one-line error
        tok = load_tokenizer(path)
        if tok.kind != "hf":
            raise TokenizerError(f"{path}: holds a {tok.kind} tokenizer, not a Hugging Face one")
        return tok
    if kind == "sentencepiece":
        if model_path is None:
            raise TokenizerError(
                "sentencepiece tokenizer needs a model path (.model file or directory)"
            )
        path = Path(model_path)
        if path.is_dir():
            return load_tokenizer(path)
        return SentencePieceTokenizer(path)
    raise TokenizerError(
        f"unknown tokenizer kind {kind!r}; expected 'bytes', 'sentencepiece' or 'hf'"
    )


__all__ = [
    "TOKENIZER_JSON",
    "ByteTokenizer",
    "PretrainedTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "load_tokenizer",
    "train_sentencepiece",
]
