"""SentencePiece BPE tokenizer for code, and the function that trains it.

Training settings for code (docs/data.md; measured ~3.5-3.8 bytes/token on Python with an exact
round trip): byte fallback (no <unk> for any valid text),
identity normalisation, whitespace kept verbatim (indentation pieces like "▁▁▁▁"), digits
split. Ids: <unk>=0, BOS <s>=1, EOS </s>=2, PAD <pad>=3, and "\n"=4 (a foreign model's
newline id is looked up in it: `newline_id`).

Newlines: sentencepiece trains line by line, so "\n" never occurs in a training sentence and
would otherwise be encoded as the byte piece <0x0A>. We register "\n" itself as a
user-defined symbol: user-defined symbols are matched before BPE and never merged, so a
newline is always exactly one token and decodes back to "\n". Encoding splits the text on
"\n" and encodes the lines as a batch, which gives the same ids as encoding the whole text
(the symbol is atomic) but is 2-4x faster, because sentencepiece slows down on long inputs.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from .base import TOKENIZER_JSON

MODEL_FILE = "tokenizer.model"
NEWLINE = "\n"
BYTE_NEWLINE = "<0x0A>"  # the byte-fallback piece of "\n"


class SentencePieceTokenizer:
    """A trained sentencepiece model behind the `Tokenizer` interface."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path | None = None, *, model_proto: bytes | None = None):
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path or model_proto")
        if model_path is not None:
            model_proto = Path(model_path).read_bytes()
        self._load(model_proto)

    def _load(self, proto: bytes) -> None:
        # Keep the exact bytes: save() writes them back unchanged, so identity() (their
        # sha256) is the same before and after a save/load cycle.
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError("sentencepiece model must define BOS and EOS ids")
        # Llama-2's model defines no PAD; its <unk> stands in (byte fallback never emits it, so
        # ignoring its labels ignores only padding).
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.unk_id
        # Ours register "\n" as an atomic user-defined symbol, so lines can be encoded apart;
        # a model trained elsewhere (Llama-2's) may only have the byte piece <0x0A>, and then
        # whole texts are encoded (its dummy prefix starts the text, not every line).
        nl = self._sp.piece_to_id(NEWLINE)
        self._split_lines = nl != self.unk_id
        if not self._split_lines:
            nl = self._sp.piece_to_id(BYTE_NEWLINE)
        self.newline_id: int | None = None if nl == self.unk_id else nl
        self._drop = {self.bos_id, self.eos_id, self.pad_id, self.unk_id}

    def encode(self, text: str) -> list[int]:
        if not self._split_lines:
            return self._sp.encode(text, num_threads=1)
        lines = text.split(NEWLINE)
        # num_threads=1: the data builder parallelises over processes already.
        encoded = self._sp.encode(lines, num_threads=1)
        ids: list[int] = list(encoded[0])
        nl = self.newline_id
        for piece_ids in encoded[1:]:
            ids.append(nl)
            ids.extend(piece_ids)
        return ids

    def decode(self, ids: list[int]) -> str:
        # Specials and ids beyond the vocabulary (a model's padded embedding rows) are dropped.
        keep = [i for i in ids if 0 <= i < self.vocab_size and i not in self._drop]
        return self._sp.decode(keep)

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / MODEL_FILE).write_bytes(self._proto)
        meta = {
            **self.identity(),
            "model_file": MODEL_FILE,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "newline_id": self.newline_id,
        }
        (out / TOKENIZER_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    def identity(self) -> dict:
        sha = hashlib.sha256(self._proto).hexdigest()
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": sha}

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (for inspection and tests)."""
        return self._sp.id_to_piece(token_id)

    # The C++ processor cannot be pickled; ship the model bytes to worker processes instead.
    def __getstate__(self) -> dict:
        return {"proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


MAX_LINE_BYTES = 1 << 20
"""The line that crosses a max_bytes budget is read to its end, but no further than this."""


def _read_bounded(path: Path, limit: int | None) -> str:
    """A file's text; with a limit, only up to the line in which its `limit`-th character falls
    (what `_iter_lines` uses of it), so a budget never makes a large file be read whole."""
    with open(path, "rb") as f:
        if limit is None:
            return f.read().decode("utf-8")
        decoder = codecs.getincrementaldecoder("utf-8")()
        parts, chars = [""], 0
        while chars < limit:
            data = f.read(limit - chars)  # a character is at least one byte: never too much
            if not data:
                break
            parts.append(decoder.decode(data))
            chars += len(parts[-1])
        else:
            if not parts[-1].endswith(NEWLINE):
                parts.append(decoder.decode(f.readline(MAX_LINE_BYTES)))
        parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _iter_lines(inputs: Iterable[str | os.PathLike], max_bytes: int | None) -> Iterator[str]:
    """Lines of the training text, stopping after max_bytes of UTF-8 text."""
    seen = 0
    for item in inputs:
        if isinstance(item, os.PathLike):
            try:
                text = _read_bounded(Path(item), None if max_bytes is None else max_bytes - seen)
            except (OSError, UnicodeDecodeError):
                continue  # training material only: an unreadable file is simply not used
        else:
            text = item
        for line in text.split(NEWLINE):
            yield line
            seen += len(line) + 1
            if max_bytes is not None and seen >= max_bytes:
                return


def train_sentencepiece(
    files_or_text_iter: Iterable[str | os.PathLike],
    out_dir: str | Path,
    vocab_size: int,
    *,
    max_mb: float | None = None,
    num_threads: int = 2,
    character_coverage: float = 0.9995,
) -> SentencePieceTokenizer:
    """Train a BPE model for code and save it to out_dir (tokenizer.json + tokenizer.model).

    Items that are `os.PathLike` (e.g. `pathlib.Path`) are read as UTF-8 files (unreadable
    ones are skipped); `str` items are training text themselves. At most `max_mb` MB of text
    is used. Characters outside `character_coverage` still round-trip via byte fallback.
    """
    max_bytes = None if max_mb is None else int(max_mb * 1_000_000)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_iter_lines(files_or_text_iter, max_bytes),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # Code lines often start with spaces; a dummy "▁" prefix would blur indentation.
        add_dummy_prefix=False,
        character_coverage=character_coverage,
        user_defined_symbols=[NEWLINE],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=num_threads,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer(model_proto=model.getvalue())
    tok.save(out_dir)
    return tok
