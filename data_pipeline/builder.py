"""The shard builder (`mtp data build`): documents -> tokens -> windows -> webdataset shards.

    tasks (sorted listing) --workers--> tokens per document, in input order (Pool.imap)
      -> exact-content dedup -> train/val by a seeded hash of the content
      -> a seeded document shuffle buffer -> one token stream per split: doc EOS doc EOS ...
      -> windows of seq_len + n_future tokens every seq_len tokens -> webdataset tar shards
      -> manifest.json (written last, atomically)

Packing: window k holds stream[k*S : k*S + S + F] (S = seq_len, F = n_future). The trainer
uses window[:S] as input and window[1:] as labels, so every stream token is an input exactly
once and the F look-ahead tokens are the next window's first inputs. Only the split's last
window(s) are padded with PAD. Everything after the listing is a pure function of the input
bytes and the seed, so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import io
import logging
import multiprocessing
import os
import re
import sys
import sysconfig
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtp_dist.tokenizers import Tokenizer

from .manifest import MANIFEST_NAME, MAX_SKIP_EXAMPLES, Manifest, ShardInfo, SplitInfo
from .sources import Limits, Task, TaskResult, plan_tasks, process_task

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 32_000_000
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")
STDLIB_EXCLUDE = (
    "**/test/**",
    "**/tests/**",
    "**/idle_test/**",
    "**/idlelib/**",
    "site-packages/**",
)
"""What the demo corpus leaves out of the interpreter's stdlib: test suites, IDLE, installed
packages. Use the same globs wherever the stdlib is read (e.g. tokenizer training)."""


def stdlib_root() -> str:
    """The running interpreter's standard library directory (the demo corpus)."""
    return sysconfig.get_paths()["stdlib"]


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array; each sample is this header plus the raw tokens."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(length, dtype=dtype))
    return buf.getvalue()[: -length * np.dtype(dtype).itemsize]


class _TarFile:
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


class _ShardSink:
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
        self.tar: _TarFile | None = None
        self.count = 0  # samples in the split so far (sample keys are unique per split)
        self.in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        if self.tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.tar = _TarFile(self.out_dir / name, self.member_size)
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


class _SplitPacker:
    """Shuffles documents through a seeded buffer, concatenates them with EOS, cuts windows."""

    def __init__(
        self,
        sink: _ShardSink,
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


# ------------------------------------------------------------------ worker processes

_worker_state: tuple[Tokenizer, Limits] | None = None


def _init_worker(tokenizer: Tokenizer, limits: Limits) -> None:
    global _worker_state
    _worker_state = (tokenizer, limits)


def _run_task(task: Task) -> TaskResult:
    assert _worker_state is not None
    return process_task(task, *_worker_state)


@contextmanager
def _results(
    tasks: list[Task], tokenizer: Tokenizer, limits: Limits, workers: int
) -> Iterator[Iterable[TaskResult]]:
    """Task results in task order, computed in `workers` processes (in-process if <= 1)."""
    if workers <= 1 or len(tasks) <= 1:
        yield (process_task(t, tokenizer, limits) for t in tasks)
        return
    # spawn, not fork: the caller (the trainer) has torch, tqdm's monitor and other threads
    # running, and a forked child can inherit a lock one of them held -- it hung here once.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, limits)) as pool:
        yield pool.imap(_run_task, tasks, chunksize=max(1, min(16, len(tasks) // (8 * workers))))


def _config(sources: Sequence, fingerprint: str, **options) -> dict:
    """The manifest's record of how it was built; `ensure_shards` compares it to decide reuse."""
    limits = options.pop("limits") or Limits()
    return {
        "sources": [str(s) for s in sources],
        **{k: list(v) if isinstance(v, tuple | list) else v for k, v in options.items()},
        "limits": dataclasses.asdict(limits),
        "fingerprint": fingerprint,
    }


class _Splitter:
    """Exact-content dedup, then train/val by document: a document goes to val when a seeded
    hash of its content, as a number in [0, 1), is below val_fraction.

    Small corpora could end with no val document at all, so the train document with the
    smallest hash is held back until the end: if val is still empty then, it goes to val
    (as if the threshold had been raised just enough), otherwise to train. Deterministic.
    """

    def __init__(self, packers: dict, seed: int, val_fraction: float, dedup: bool) -> None:
        self.packers, self.val_fraction, self.dedup = packers, val_fraction, dedup
        self.salt = seed.to_bytes(8, "little", signed=True)
        self.seen: set[bytes] = set()
        self.assigned = Counter()
        self.duplicates = self.tokens = 0
        self.held: tuple[float, np.ndarray] | None = None

    def add(self, digest: bytes, tokens: np.ndarray) -> None:
        if self.dedup:
            if digest[:16] in self.seen:
                self.duplicates += 1
                return
            self.seen.add(digest[:16])
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


def _clear_previous(out_dir: Path) -> None:
    """Remove an earlier build's manifest and shards (only files this builder names)."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if SHARD_NAME.match(path.name):
            path.unlink()


def build_shards(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    seq_len: int,
    n_future: int,
    *,
    include: Sequence[str] = ("**/*.py",),
    exclude: Sequence[str] = (),
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    val_fraction: float = 0.02,
    dedup: bool = True,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    limits: Limits | None = None,
    shuffle_docs: int = 1024,
) -> Manifest:
    """Build train/val shards from directories, JSONL and text files; return the manifest.

    `shuffle_docs` is the size of the seeded document shuffle buffer applied before packing
    (1 keeps input order). Skipped inputs are counted per reason in `manifest.totals`.
    """
    if seq_len < 1 or n_future < 1:
        raise ValueError(f"seq_len and n_future must be >= 1 (got {seq_len}, {n_future})")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    limits = limits or Limits()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    tasks, skips, fingerprint = plan_tasks(sources, include, exclude)

    window = seq_len + n_future
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32)
    packers = {
        split: _SplitPacker(
            _ShardSink(out, split, dtype, window, shard_bytes),
            seq_len,
            n_future,
            tokenizer.eos_id,
            tokenizer.pad_id,
            np.random.default_rng([seed, i]),
            shuffle_docs,
        )
        for i, split in enumerate(SPLITS)
    }
    splitter = _Splitter(packers, seed, val_fraction, dedup)
    files = bytes_in = 0
    bar = tqdm(
        total=sum(t.size for t in tasks),
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="data build",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
    )
    with _results(tasks, tokenizer, limits, workers) as results:
        for task, result in zip(tasks, results, strict=True):
            files += result.files
            bytes_in += result.bytes_in
            skips.extend(result.skips)
            for digest, tokens in result.docs:
                splitter.add(digest, tokens)
            bar.update(task.size)
            bar.set_postfix(files=files, tokens=f"{splitter.tokens / 1e6:.2f}M", refresh=False)
    bar.close()
    splits = splitter.finish()

    reasons = Counter(reason for _, reason, _ in skips)
    manifest = Manifest(
        tokenizer=tokenizer.identity(),
        special_ids={"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
        seq_len=seq_len,
        n_future=n_future,
        window=window,
        stride=seq_len,
        dtype=dtype.name,
        sample_bytes=packers["train"].sink.sample_bytes,
        splits=splits,
        totals={
            "files": files,
            "documents": sum(s.documents for s in splits.values()),
            "duplicates": splitter.duplicates,
            "bytes": bytes_in,
            "tokens": splitter.tokens,
            "skipped": dict(sorted(reasons.items())),
        },
        skipped=[{"name": n, "reason": r, "detail": d} for n, r, d in skips[:MAX_SKIP_EXAMPLES]],
        config=_config(
            sources,
            fingerprint,
            include=include,
            exclude=exclude,
            seed=seed,
            val_fraction=val_fraction,
            dedup=dedup,
            shard_bytes=shard_bytes,
            shuffle_docs=shuffle_docs,
            limits=limits,
        ),
    )
    manifest.save(out / MANIFEST_NAME)
    seconds = time.perf_counter() - start
    manifest.build_stats = {"seconds": seconds, "mb_per_s": bytes_in / 1e6 / max(seconds, 1e-9)}
    _summary(manifest, progress)
    return manifest


def _summary(m: Manifest, to_stderr: bool) -> None:
    t, s = m.totals, m.build_stats
    lines = [
        f"data build: {t['files']} files, {t['bytes'] / 1e6:.1f} MB, {t['documents']} documents, "
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


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serialise builders of one directory across processes (e.g. several ranks on a node)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reusable(
    path: Path, tokenizer: Tokenizer, seq_len: int, n_future: int, config: dict
) -> Manifest | None:
    if not path.is_file():
        return None
    m = Manifest.load(path)
    if (m.tokenizer, m.seq_len, m.n_future) != (tokenizer.identity(), seq_len, n_future):
        return None
    if m.config != config:
        return None
    if not all((path.parent / s.name).is_file() for sp in m.splits.values() for s in sp.shards):
        return None
    return m


_BUILD_OPTIONS = inspect.signature(build_shards).parameters
_RECORDED = (
    "include",
    "exclude",
    "seed",
    "val_fraction",
    "dedup",
    "shard_bytes",
    "shuffle_docs",
    "limits",
)


def ensure_shards(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    seq_len: int,
    n_future: int,
    **kw,
) -> Manifest:
    """`build_shards` unless out_dir already holds a build of the same input and settings.

    Reuse needs the same tokenizer identity, window, build options and an unchanged listing
    (file names, sizes, mtimes). Safe to call from several processes at once.
    """
    out = Path(out_dir)
    options = {name: p.default for name, p in _BUILD_OPTIONS.items() if name in _RECORDED}
    options.update((k, v) for k, v in kw.items() if k in _RECORDED)
    with _locked(out):
        _, _, fingerprint = plan_tasks(sources, options["include"], options["exclude"])
        config = _config(sources, fingerprint, **options)
        found = _reusable(out / MANIFEST_NAME, tokenizer, seq_len, n_future, config)
        if found is not None:
            return found
        return build_shards(sources, out, tokenizer, seq_len, n_future, **kw)


def ensure_stdlib_shards(
    out_dir: str | os.PathLike, tokenizer: Tokenizer, seq_len: int, n_future: int, **kw
) -> Manifest:
    """The demo corpus: this interpreter's stdlib .py files without tests (~730 files, 12 MB),
    built on first use and reused afterwards."""
    kw.setdefault("include", ("**/*.py",))
    kw.setdefault("exclude", STDLIB_EXCLUDE)
    return ensure_shards([stdlib_root()], out_dir, tokenizer, seq_len, n_future, **kw)
