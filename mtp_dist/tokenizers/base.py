"""The tokenizer interface shared by the trainer, the data builder and the generator.

Three implementations exist: `ByteTokenizer` (UTF-8 bytes, no training),
`SentencePieceTokenizer` (BPE trained on code) and `PretrainedTokenizer` (an imported
checkpoint's own Hugging Face tokenizer). Each writes `tokenizer.json` with `save()`, and
`load_tokenizer()` reads it back, so a run directory fully describes its tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

TOKENIZER_JSON = "tokenizer.json"
"""File name `save()` writes into the tokenizer directory."""


class TokenizerError(ValueError):
    """A tokenizer directory or setting that cannot be used: one line, naming it."""


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers. `encode` adds no BOS/EOS; `decode` drops specials."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...

    def identity(self) -> dict: ...
