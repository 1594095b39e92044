"""How much a model knows about code: head-1 bits per byte on held-out files, per-head top-1
accuracy, and the same files' size under gzip -9 and xz -9e (bench/quality.py is the CLI).

    files, skipped = select_files(HELD_OUT, limit=60, tokenizer=tok)
    report = evaluate(files, model, tok, context=128, stride=64)

Scoring (docs/benchmarks.md, "Quality: bits per byte on held-out code"): a file is the sequence
`[EOS] + encode(text)` — training packs documents as `doc EOS doc EOS ...` (docs/data.md), so
EOS is what a document follows — and EVERY file token is predicted exactly once, from a causal
window of `context` tokens at positions 0.. (training windows start anywhere in the stream with
positions 0.., so positions relative to the window are what the model was trained on). Strided
evaluation over the input positions 0..T-1 (input position p predicts token p + 1):

    window 0:  inputs [0, C)                        scores all C of its positions
    window k:  inputs [e - C, e), e = min(C + kS, T) scores only [previous end, e)

so a prediction sees at least C - S + 1 tokens (its own input token and C - S before it), except
in the first window, where it sees the whole file so far. Bits are -log2 of the softmax over the
model's whole (padded) vocabulary, as in the training loss, so bits/token x ln 2 is comparable
with head 1's validation loss in nats. The byte count is len(text.encode("utf-8")), which is
what was scored only if decode(encode(text)) == text; files that do not round-trip are skipped.
"""

from __future__ import annotations

import gzip
import lzma
import math
import sysconfig
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.chain import zero_first_position

HELD_OUT = Path(sysconfig.get_paths()["stdlib"]) / "test"
"""CPython's own test suite: code the stdlib training corpus leaves out (STDLIB_EXCLUDE)."""

COMPRESSORS = ("gzip", "xz")


@dataclass
class HeldOutFile:
    path: Path
    text: str

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8")


@dataclass
class FileScore:
    """One file's score. `bits`: sum of head-1 -log2 p over its tokens; per head i (0-based,
    predicting i + 1 tokens ahead), `correct[i]` argmax hits out of `counted[i]` positions."""

    tokens: int
    bytes: int
    bits: float
    correct: list[int] = field(default_factory=list)
    counted: list[int] = field(default_factory=list)

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes


def windows(n_inputs: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over input positions [0, n_inputs): the window
    runs inputs [start, end) and scores positions [first_scored, end). The scored ranges tile
    [0, n_inputs) without overlap; all windows have length min(context, n_inputs)."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n_inputs <= context:
        return [(0, n_inputs, 0)] if n_inputs else []
    spans, end = [(0, context, 0)], context
    while end < n_inputs:
        # The last window is still a full one, ending at the file end: its few new positions
        # get more context than S would give, never less.
        new_end = min(end + stride, n_inputs)
        spans.append((new_end - context, new_end, end))
        end = new_end
    return spans


def round_trips(tokenizer, text: str) -> bool:
    """Whether decode(encode(text)) == text, i.e. the scored tokens are exactly the file."""
    return tokenizer.decode(tokenizer.encode(text)) == text


@torch.no_grad()
def score_ids(
    model, ids: list[int], eos_id: int, context: int, stride: int, batch_windows: int = 16
) -> FileScore:
    """Score the tokens `ids` of one document (bytes left 0: the caller knows them)."""
    n_heads = model.cfg.n_future
    device = model.rope_cos.device
    seq = torch.tensor([eos_id, *ids], device=device)  # (T + 1,): input p predicts seq[p + 1]
    # Targets past the file end read -1 (never a token id) and are not counted.
    padded = torch.cat([seq, seq.new_full((n_heads,), -1)])
    bits = 0.0
    correct, counted = [0] * n_heads, [0] * n_heads
    spans = windows(len(ids), context, stride)
    for b in range(0, len(spans), batch_windows):
        group = spans[b : b + batch_windows]
        starts = torch.tensor([s for s, _, _ in group], device=device)
        width = group[0][1] - group[0][0]  # every window of a file has the same length
        offsets = torch.arange(width, device=device)
        pos = starts[:, None] + offsets  # (B, W) absolute input positions
        firsts = torch.tensor([f for _, _, f in group], device=device)
        scored = pos >= firsts[:, None]  # (B, W)
        h, cos, sin = model.trunk_forward(seq[pos])  # (B, W, d)
        whole = None  # a chained model's previous depth, (B, W, d)
        for i in range(n_heads):
            target = padded[pos + i + 1][scored]  # (M,)
            # The head layer needs the whole window (attention); the unembedding, the largest
            # matmul, only the scored positions.
            if model.cfg.chained:  # depth i reads depth i-1 and the embedded token t + i
                ahead = model.embed(padded[pos + i].clamp(min=0)) if i else None
                ahead = zero_first_position(ahead, offsets) if i else None
                whole = model.heads.depth_hidden(i, h if i == 0 else whole, ahead, cos, sin)
                hidden = whole[scored]
            else:
                hidden = model.heads.head_hidden(i, h, cos, sin)[scored]  # (M, d)
            logits = model.heads.project(hidden)  # (M, V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            valid = target >= 0
            correct[i] += int((logits.argmax(-1) == target)[valid].sum())
            counted[i] += int(valid.sum())
            if i == 0:  # head 1's targets are always inside the file
                logp = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])
                bits -= float(logp.sum()) / math.log(2)
    return FileScore(len(ids), 0, bits, correct, counted)


def score_file(
    model, tokenizer, text: str, context: int, stride: int, batch_windows: int = 16
) -> FileScore:
    """Head-1 bits and per-head accuracy of one file, scored as `[EOS] + encode(text)`."""
    ids = tokenizer.encode(text)
    if tokenizer.decode(ids) != text:
        raise ValueError("text does not round-trip through the tokenizer")
    score = score_ids(model, ids, tokenizer.eos_id, context, stride, batch_windows)
    score.bytes = len(text.encode("utf-8"))
    return score


XZ_PRESET = 9 | lzma.PRESET_EXTREME


def compressor_bits(data: bytes) -> dict[str, int]:
    """Bits of `data` compressed on its own (container headers included, as `gzip -9 f | wc -c`
    counts them): {'gzip': gzip -9, 'xz': xz -9e}. Bits per byte = bits / len(data)."""
    return {
        "gzip": 8 * len(gzip.compress(data, compresslevel=9)),
        "xz": 8 * len(lzma.compress(data, preset=XZ_PRESET)),
    }


def stream_bits(data: bytes) -> dict[str, int]:
    """Bits of the same compressed streams without their containers: raw deflate (gzip's
    10-byte header and 8-byte trailer off) and raw LZMA2 (xz's ~56 bytes of stream header,
    block header, check, index and footer off). What a file pays for its container is
    compressor_bits - stream_bits: on a 47-byte file most of gzip's bits, on 40 KB almost none."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # wbits -15: raw deflate, no container
    lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": XZ_PRESET}]
    return {
        "gzip": 8 * len(deflate.compress(data) + deflate.flush()),
        "xz": 8 * len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=lzma2)),
    }


def select_files(
    directory: str | Path, limit: int, tokenizer=None
) -> tuple[list[HeldOutFile], Counter]:
    """The first `limit` usable `.py` files under `directory` (recursive, sorted by path), and
    how many were skipped, by reason: 'invalid_utf8', 'empty' (only whitespace, as the data
    builder counts it), 'round_trip' (only with a tokenizer)."""
    chosen, skipped = [], Counter()
    root = Path(directory)
    paths = sorted(p for p in root.rglob("*.py") if p.is_file()) if root.is_dir() else []
    for path in paths:
        if len(chosen) == limit:
            break
        try:
            # Bytes, not read_text(): universal newlines would turn \r\n into \n, and training
            # reads bytes too.
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
        elif tokenizer is not None and not round_trips(tokenizer, text):
            skipped["round_trip"] += 1
        else:
            chosen.append(HeldOutFile(path, text))
    return chosen, skipped


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def evaluate(
    files: Iterable[HeldOutFile],
    model=None,
    tokenizer=None,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_windows: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Totals over `files` (sum of bits / sum of bytes) for the model (skipped when `model` is
    None) and the compressors, each file compressed on its own like each is scored on its own;
    `<compressor>_container_share` is the part of a compressor's bits that are its per-file
    containers, not compression. `bits_per_byte_file_mean` weights each file equally (the
    model only: for a compressor it would mostly measure the containers of the small files).
    Tokens are counted whenever a tokenizer is given. `context` is needed with a model;
    `stride` defaults to context // 2. `progress(files_done, bytes_done)` follows each file."""
    if model is not None:
        if context is None:
            raise ValueError("scoring a model needs a context length")
        stride = stride or max(1, context // 2)
    files = list(files)
    n_bytes = sum(len(f.data) for f in files)
    comp_bits = dict.fromkeys(COMPRESSORS, 0)
    container_bits = dict.fromkeys(COMPRESSORS, 0)
    scores: list[FileScore] = []
    tokens = done_bytes = 0
    for done, f in enumerate(files, 1):
        data = f.data
        streams = stream_bits(data)
        for name, bits in compressor_bits(data).items():
            comp_bits[name] += bits
            container_bits[name] += bits - streams[name]
        if model is not None:
            scores.append(score_file(model, tokenizer, f.text, context, stride, batch_windows))
            tokens += scores[-1].tokens
        elif tokenizer is not None:
            tokens += len(tokenizer.encode(f.text))
        done_bytes += len(data)
        if progress is not None:
            progress(done, done_bytes)
    report = {
        "files": len(files),
        "bytes": n_bytes,
        "tokens": tokens if tokenizer is not None else None,
        "bytes_per_token": _ratio(n_bytes, tokens),
        "context": context,
        "stride": stride,
        "bits_per_byte": None,
        "bits_per_byte_file_mean": None,
        "bits_per_token": None,
        "head_accuracy": [],
    }
    for name in COMPRESSORS:
        report[f"{name}_bits_per_byte"] = _ratio(comp_bits[name], n_bytes)
        report[f"{name}_container_share"] = _ratio(container_bits[name], comp_bits[name])
    if scores:
        bits = sum(s.bits for s in scores)
        n_heads = len(scores[0].correct)
        report["bits_per_byte"] = bits / n_bytes
        report["bits_per_byte_file_mean"] = sum(s.bits_per_byte for s in scores) / len(scores)
        report["bits_per_token"] = bits / tokens
        report["head_accuracy"] = [
            _ratio(sum(s.correct[i] for s in scores), sum(s.counted[i] for s in scores))
            for i in range(n_heads)
        ]
    return report
