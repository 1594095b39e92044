"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then BOS=256, EOS=257, PAD=258.

The vocabulary has 259 entries; the model rounds its embedding table up itself. No training,
no model file: the identity is a fixed string, so shards built with it never go stale.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import TOKENIZER_JSON


class ByteTokenizer:
    """UTF-8 bytes as tokens. `decode(encode(s)) == s` for every str that is valid UTF-8."""

    kind = "bytes"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        # Strict: a str with lone surrogates is not valid UTF-8 and raises UnicodeEncodeError,
        # which the data builder counts as "invalid_utf8" rather than storing altered text.
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # Specials and ids beyond the vocabulary (a model's padded embedding rows) are dropped;
        # invalid byte sequences can only come from a model, so they become U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKENIZER_JSON).write_text(json.dumps(self.identity(), indent=2) + "\n")

    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": "bytes-utf8-v1"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"
