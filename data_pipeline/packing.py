"""Packing: documents in input order -> dedup -> train/val -> shuffled stream -> windows -> tars.

Shared by the one-machine build (`builder.build_shards`) and the merge of parts
(`parts.merge_parts`): both feed the same `Splitter` the same documents in the same order, which
is what makes a merged build equal to a one-machine build byte for byte.

Packing: window k holds stream[k*S : k*S + S + F] (S = seq_len, F = n_future). The trainer
uses window[:S] as input and window[1:] as labels, so every stream token is an input exactly
once and the F look-ahead tokens are the next window's first inputs. Only the split's last
window(s) are padded with PAD.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from .manifest import MANIFEST_NAME, MAX_SKIP_EXAMPLES, Manifest, ShardInfo, SplitInfo

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")
DEDUP_KEY_BYTES = 16
"""Dedup compares this prefix of a document's sha256 (a collision needs ~2^64 documents)."""


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array; each sample is this header plus the raw tokens."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(length, dtype=dtype))
    return buf.getvalue()[: -length * np.dtype(dtype).itemsize]


class TarWriter:
    """A minimal, fast writer of the ustar files that `webdataset.TarWriter` produces.

    Every member of a shard has the same size, so one header template serves all of them and
    only the name and checksum change: ~10x faster than `tarfile.addfile`, which made the
    parent process the bottleneck of a build. The sha256 is computed while writing.
    """

    def __init__(self, path: Path, member_size: int) -> None:
        info = tarfile.TarInfo("")
        info.size, info.mtime, info.mode = member_size, 0, 0o444  # fixed: reproducible bytes
        info.uname = info.gname = "bigdata"  # what webdataset.TarWriter writes
        self.template = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        self.template[148:156] = b" " * 8  # the checksum is computed over blanks here
        self.base_sum = sum(self.template)
        self.padding = b"\0" * (-member_size % 512)
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def add(self, name: bytes, data: bytes) -> None:
        header = self.template.copy()
        header[: len(name)] = name
        header[148:155] = b"%06o\0" % (self.base_sum + sum(name))
        self._put(bytes(header) + data + self.padding)

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, padded to tar's 10 KiB record); (bytes, sha256)."""
        end = self.bytes + 1024
        self._put(b"\0" * (1024 + (-end % tarfile.RECORDSIZE)))
        self.file.close()
        return self.bytes, self.sha.hexdigest()


class ShardSink:
    """Writes windows of one split into <split>-NNNNNN.tar files of about shard_bytes each.

    One sample per window: `<key>.tokens.npy`, a standard .npy file of `window` tokens.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, window: int, shard_bytes: int):
        self.out_dir, self.split, self.shard_bytes = out_dir, split, shard_bytes
        self.window, self.dtype = window, dtype
        self.header = npy_header(dtype, window)
        self.member_size = len(self.header) + window * dtype.itemsize
        self.sample_bytes = 512 + -(-self.member_size // 512) * 512  # header + padded data
        self.shards: list[ShardInfo] = []
        self.tar: TarWriter | None = None
        self.count = 0  # samples in the split so far (sample keys are unique per split)
        self.in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        if self.tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.tar = TarWriter(self.out_dir / name, self.member_size)
            self.shards.append(ShardInfo(name, 0, 0, 0, ""))
        self.tar.add(b"%010d.tokens.npy" % self.count, self.header + tokens.tobytes())
        self.count += 1
        self.in_shard += 1
        if self.tar.bytes >= self.shard_bytes:
            self._close()

    def _close(self) -> None:
        if self.tar is None:
            return
        info = self.shards[-1]
        info.bytes, info.sha256 = self.tar.close()
        info.samples, info.tokens = self.in_shard, self.in_shard * self.window
        self.tar, self.in_shard = None, 0

    def finish(self) -> list[ShardInfo]:
        self._close()
        return self.shards


class SplitPacker:
    """Shuffles documents through a seeded buffer, concatenates them with EOS, cuts windows."""

    def __init__(
        self,
        sink: ShardSink,
        seq_len: int,
        n_future: int,
        eos: int,
        pad: int,
        rng: np.random.Generator,
        shuffle_docs: int,
    ):
        self.sink, self.stride, self.window = sink, seq_len, seq_len + n_future
        self.eos, self.pad, self.rng, self.shuffle_docs = eos, pad, rng, shuffle_docs
        self.buffer: list[np.ndarray] = []  # documents waiting in the shuffle buffer
        self.pending: list[np.ndarray] = []  # stream pieces not yet fully cut into windows
        self.pending_len = 0
        self.eos_arr = np.array([eos], dtype=sink.dtype)
        self.documents = self.stream_tokens = self.pad_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        if self.shuffle_docs <= 1:
            self._append(tokens)
            return
        self.buffer.append(tokens)
        if len(self.buffer) >= self.shuffle_docs:
            i = int(self.rng.integers(len(self.buffer)))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            self._append(self.buffer.pop())

    def _append(self, tokens: np.ndarray) -> None:
        self.pending += [tokens, self.eos_arr]
        self.pending_len += len(tokens) + 1
        self.documents += 1
        self.stream_tokens += len(tokens) + 1
        if self.pending_len >= self.window:
            self._cut(final=False)

    def _cut(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else self.eos_arr[:0]
        pos, window, stride = 0, self.window, self.stride
        while len(stream) - pos >= window:
            self.sink.write(stream[pos : pos + window])
            pos += stride
        if final:  # every remaining token must still be an input once: pad the tail window(s)
            while pos < len(stream):
                tail = stream[pos : pos + window]
                pad = np.full(window - len(tail), self.pad, dtype=stream.dtype)
                self.sink.write(np.concatenate([tail, pad]))
                self.pad_tokens += len(pad)
                pos += stride
        rest = stream[pos:]
        self.pending, self.pending_len = [rest], len(rest)

    def finish(self) -> SplitInfo:
        for i in self.rng.permutation(len(self.buffer)):
            self._append(self.buffer[i])
        self.buffer = []
        self._cut(final=True)
        return SplitInfo(self.sink.finish(), self.documents, self.stream_tokens, self.pad_tokens)


class Splitter:
    """Exact-content dedup, then train/val by document: a document goes to val when a seeded
    hash of its content, as a number in [0, 1), is below val_fraction.

    Small corpora could end with no val document at all, so the train document with the
    smallest hash is held back until the end: if val is still empty then, it goes to val
    (as if the threshold had been raised just enough), otherwise to train. Deterministic.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        dtype: np.dtype,
        seq_len: int,
        n_future: int,
        eos: int,
        pad: int,
        seed: int,
        val_fraction: float,
        dedup: bool,
        shard_bytes: int,
        shuffle_docs: int,
    ) -> None:
        self.packers = {
            split: SplitPacker(
                ShardSink(out_dir, split, dtype, seq_len + n_future, shard_bytes),
                seq_len,
                n_future,
                eos,
                pad,
                np.random.default_rng([seed, i]),
                shuffle_docs,
            )
            for i, split in enumerate(SPLITS)
        }
        self.val_fraction, self.dedup = val_fraction, dedup
        self.sample_bytes = self.packers["train"].sink.sample_bytes
        self.salt = seed.to_bytes(8, "little", signed=True)
        self.seen: set[bytes] = set()
        self.assigned = Counter()
        self.duplicates = self.tokens = 0
        self.held: tuple[float, np.ndarray] | None = None

    def add(self, digest: bytes, tokens: np.ndarray) -> None:
        if self.dedup:
            key = digest[:DEDUP_KEY_BYTES]
            if key in self.seen:
                self.duplicates += 1
                return
            self.seen.add(key)
        self.tokens += len(tokens)
        h = int.from_bytes(hashlib.sha256(self.salt + digest).digest()[:8], "little") / 2.0**64
        split = "val" if h < self.val_fraction else "train"
        self.assigned[split] += 1
        if split == "train" and self.val_fraction > 0:
            if self.held is not None and self.held[0] <= h:
                self.packers["train"].add(tokens)
                return
            if self.held is not None:
                self.packers["train"].add(self.held[1])
            self.held = (h, tokens)
            return
        self.packers[split].add(tokens)

    def finish(self) -> dict[str, SplitInfo]:
        if self.held is not None:
            to_val = self.assigned["val"] == 0 and self.assigned["train"] > 1
            self.packers["val" if to_val else "train"].add(self.held[1])
        return {name: packer.finish() for name, packer in self.packers.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32: the dtype of stored tokens."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def make_manifest(
    splitter: Splitter,
    splits: dict[str, SplitInfo],
    *,
    tokenizer: dict,
    special_ids: dict,
    seq_len: int,
    n_future: int,
    dtype: np.dtype,
    files: int,
    bytes_in: int,
    duplicates: int,
    skip_counts: Counter,
    skip_entries: list[tuple[str, str, str]],
    config: dict,
) -> Manifest:
    """The manifest of a finished packing; `duplicates` adds to those the splitter dropped
    (a part drops its own before the merge sees them)."""
    return Manifest(
        tokenizer=tokenizer,
        special_ids=special_ids,
        seq_len=seq_len,
        n_future=n_future,
        window=seq_len + n_future,
        stride=seq_len,
        dtype=dtype.name,
        sample_bytes=splitter.sample_bytes,
        splits=splits,
        totals={
            "files": files,
            "documents": sum(s.documents for s in splits.values()),
            "duplicates": duplicates + splitter.duplicates,
            "bytes": bytes_in,
            "tokens": splitter.tokens,
            "skipped": dict(sorted(skip_counts.items())),
        },
        skipped=[
            {"name": n, "reason": r, "detail": d} for n, r, d in skip_entries[:MAX_SKIP_EXAMPLES]
        ],
        config=config,
    )


def clear_previous(out_dir: Path) -> None:
    """Remove an earlier build's manifest and shards (only files this builder names)."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if SHARD_NAME.match(path.name):
            path.unlink()


def summary(m: Manifest, to_stderr: bool, what: str = "data build") -> None:
    """The lines printed after a build or a merge (to stderr, or the log when quiet)."""
    t, s = m.totals, m.build_stats
    lines = [
        f"{what}: {t['files']} files, {t['bytes'] / 1e6:.1f} MB, {t['documents']} documents, "
        f"{t['tokens']} tokens in {s['seconds']:.1f}s ({s['mb_per_s']:.1f} MB/s)",
        *(
            f"  {name}: {sp.documents} docs, {sp.samples} windows of {m.window} tokens, "
            f"{len(sp.shards)} shards, {sp.pad_tokens} pad tokens"
            for name, sp in m.splits.items()
        ),
        f"  duplicates dropped: {t['duplicates']}; skipped: "
        + (", ".join(f"{r}={n}" for r, n in t["skipped"].items()) or "none"),
        f"  manifest: {m.location}",
    ]
    for line in lines:
        print(line, file=sys.stderr) if to_stderr else log.info(line)
