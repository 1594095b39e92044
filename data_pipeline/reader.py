"""The reader: `TokenWindowLoader` streams packed windows from the shards a manifest lists.

Order of one epoch, a pure function of (manifest, seed, epoch, dp_size, batch_size, workers):

  1. shard order: a permutation seeded by (seed, epoch) (train; val keeps manifest order);
     the global sample sequence is the shards' samples concatenated in that order.
  2. data-parallel rank r takes the contiguous block [r*M, r*M + M) with M = N // dp_size, so
     each rank reads ~1/dp_size of the shards. Train uses batches_per_epoch = M // batch_size
     rounded down to a multiple of the worker count - the same on every rank, so no rank runs
     out early and hangs a collective. Val uses M = ceil(N / dp_size), wrapping around to the
     start, and a smaller last batch: every sample is seen, counts still equal on all ranks.
  3. DataLoader worker w takes the w-th contiguous slice of the rank's batches; its stream is
     cut into groups of ceil(shuffle_buffer / batch_size) batches, and each group is shuffled
     with an RNG seeded by (seed, epoch, rank, worker, group). Unlike a stateful stream buffer
     this is reproducible from a position alone, which is what makes resume exact.
  4. The DataLoader hands out batches round-robin over workers (torch's in-order rule), so
     rank batch i of an epoch is batch i // W of worker i % W.

The position is (epoch, batches consumed in the epoch), counted in the consuming process, so
`state_dict()` is exact whatever the workers have prefetched, and it is the same on every rank.
Shards are streamed with webdataset's tar iterators from local paths, `pipe:` commands or any
fsspec URL; missing, truncated or corrupt shards raise `ShardError` naming the shard.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen

from mtp_dist.tokenizers import Tokenizer

from .manifest import Manifest, ManifestError

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ShardError(RuntimeError):
    """A shard is missing, unreadable, truncated or does not match its manifest entry."""


def open_url(url: str):
    """A binary stream for a local path, `pipe:CMD`, file:// or any fsspec URL."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe") or len(scheme) == 1:  # len 1: a Windows drive letter
        return gopen(url, "rb")
    import fsspec  # only remote/other schemes need it

    return fsspec.open(url, "rb").open()


class _HashingStream:
    """Wraps a stream and hashes what is read, to check a fully read shard's sha256."""

    def __init__(self, stream) -> None:
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()

    def close(self) -> None:
        self.stream.close()


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs; plain data so it pickles into DataLoader workers."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    shas: tuple[str, ...]
    sample_bytes: int  # 0: unknown, never seek
    first_keys: tuple[int, ...]  # sample keys count up through a split's shards
    dtype: str
    window: int
    train: bool
    batch_size: int
    dp_rank: int
    dp_size: int
    workers: int  # >= 1 (0 DataLoader workers behaves as 1)
    seed: int
    group_batches: int  # batches per shuffle group; 0 = no shuffle
    batches: int  # per rank per epoch
    rank_samples: int  # M
    on_bad_shard: str
    verify_sha256: bool

    @property
    def total(self) -> int:
        return sum(self.counts)

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(len(self.counts))
        return np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.counts))

    def worker_batches(self, w: int) -> tuple[int, int]:
        """[first, last) rank batches of worker w."""
        return w * self.batches // self.workers, (w + 1) * self.batches // self.workers

    def runs(self, epoch: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard, start, stop) pieces of the rank-relative sample range [lo, hi)."""
        order = self.shard_order(epoch)
        offsets = np.concatenate([[0], np.cumsum(np.asarray(self.counts)[order])])
        out: list[tuple[int, int, int]] = []
        pos, end = self.dp_rank * self.rank_samples + lo, self.dp_rank * self.rank_samples + hi
        while pos < end:  # positions past N wrap to the start (val padding)
            base = pos - pos % self.total
            a, b = pos - base, min(end - base, self.total)
            i = int(np.searchsorted(offsets, a, side="right")) - 1
            while a < b:
                stop = min(b, int(offsets[i + 1]))
                if stop > a:
                    out.append((int(order[i]), a - int(offsets[i]), stop - int(offsets[i])))
                a, i = stop, i + 1
            pos = base + b
        return out


class _ShardCursor:
    """Reads sample ranges from shards, keeping the current shard open for sequential reads."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.shard = -1
        self.pos = 0
        self.it: Iterator[dict] | None = None
        self.stream: _HashingStream | None = None
        self.bad: set[int] = set()
        self.from_start = False

    def _fail(self, msg: str) -> ShardError:
        self.close()
        return ShardError(f"shard {self.spec.urls[self.shard]}: {msg}")

    def _open(self, shard: int, start: int) -> None:
        """Open a shard positioned at sample `start`: by seeking in a local file (every sample
        has the same size), otherwise by reading through the samples before it."""
        self.close()
        self.shard, self.pos = shard, 0
        try:
            raw = open_url(self.spec.urls[shard])
            self.stream = _HashingStream(raw)
            if start and self.spec.sample_bytes and getattr(raw, "seekable", bool)():
                raw.seek(start * self.spec.sample_bytes)
                self.pos = start
        except Exception as err:
            raise self._fail(f"cannot open ({type(err).__name__}: {err})") from err
        self.from_start = self.pos == 0
        source = [{"url": self.spec.urls[shard], "stream": self.stream}]
        self.it = tariterators.group_by_keys(tariterators.tar_file_expander(source))

    def _next(self) -> np.ndarray:
        count = self.spec.counts[self.shard]
        try:
            sample = next(self.it)
        except StopIteration:
            raise self._fail(f"ends after {self.pos} samples; the manifest lists {count}") from None
        except Exception as err:  # tarfile.ReadError on truncation, OSError from pipes, ...
            why = f"{type(err).__name__}: {err}"
            raise self._fail(f"unreadable after {self.pos} samples ({why})") from err
        data = sample.get("tokens.npy")
        if data is None or data[:6] != b"\x93NUMPY":
            raise self._fail(f"sample {sample.get('__key__')} has no tokens.npy")
        if int(sample["__key__"]) != self.spec.first_keys[self.shard] + self.pos:
            raise self._fail(f"sample {sample['__key__']} found where sample {self.pos} belongs")
        # .npy: magic, version, header length (2 bytes in v1, 4 in v2+), header, raw data
        size_bytes = 2 if data[6] == 1 else 4
        offset = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
        arr = np.frombuffer(data, dtype=self.spec.dtype, offset=offset)
        if arr.size != self.spec.window:
            raise self._fail(
                f"sample {sample['__key__']} has {arr.size} tokens, expected {self.spec.window}"
            )
        self.pos += 1
        if self.pos == count:
            self._finish()
        return arr

    def _finish(self) -> None:
        """At a shard's last sample: it must end here, and (if read whole) match its sha256."""
        if next(self.it, None) is not None:
            raise self._fail(f"has more samples than the {self.pos} the manifest lists")
        if self.spec.verify_sha256 and self.from_start:
            digest = self.stream.drain()
            if digest != self.spec.shas[self.shard]:
                raise self._fail(f"sha256 {digest[:12]}... differs from the manifest's")
        self.close()

    def read(self, shard: int, start: int, stop: int) -> list[np.ndarray | None]:
        """Samples [start, stop) of a shard; None for unreadable ones when skipping bad shards."""
        out: list[np.ndarray | None] = []
        if shard in self.bad:
            return [None] * (stop - start)
        try:
            # reopen to seek when going backwards or skipping far ahead; stay for short gaps
            if shard != self.shard or self.it is None or not 0 <= start - self.pos < 64:
                self._open(shard, start)
            while self.pos < start:
                self._next()
            while len(out) < stop - start:
                out.append(self._next())
        except ShardError as err:
            if self.spec.on_bad_shard == "error":
                raise
            log.warning("skipping the rest of a bad shard: %s", err)
            self.bad.add(shard)
            out += [None] * (stop - start - len(out))
        return out

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # a pipe's exit status after we stopped early is irrelevant
                pass
        self.stream, self.it = None, None


class _WindowStream(IterableDataset):
    """One rank's batches from (start_epoch, start_batch); yields (tokens, n_bad_samples)."""

    def __init__(self, spec: _Spec, start_epoch: int, start_batch: int) -> None:
        self.spec, self.start_epoch, self.start_batch = spec, start_epoch, start_batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        info = get_worker_info()
        spec = self.spec
        cursor = _ShardCursor(spec)
        # Round-robin: rank batch i of an epoch comes from worker slice i % W. A fresh
        # DataLoader always starts at its worker 0, so after k batches worker 0 must play
        # slice k % W (and so on): roles rotate by k. Of the first k batches, slice w made
        # those with index % W == w.
        k, nw = self.start_batch, spec.workers
        w = ((0 if info is None else info.id) + k) % nw
        skip = k // nw + (1 if w < k % nw else 0)
        epoch = self.start_epoch
        last_good: list[np.ndarray] = []
        try:
            while True:
                yield from self._epoch(cursor, epoch, w, skip, last_good)
                if not spec.train:
                    return
                epoch, skip = epoch + 1, 0
        finally:
            cursor.close()

    def _epoch(self, cursor: _ShardCursor, epoch: int, w: int, skip: int, last_good: list):
        spec, bs = self.spec, self.spec.batch_size
        first, last = spec.worker_batches(w)
        group = spec.group_batches or 1
        b = first + skip - skip % group  # start of the group holding the first batch to yield
        while b < last:
            g_end = min(b + group, last)
            lo, hi = b * bs, min(g_end * bs, spec.rank_samples)
            samples: list[np.ndarray | None] = []
            for shard, start, stop in spec.runs(epoch, lo, hi):
                samples += cursor.read(shard, start, stop)
            pending_bad = _fill_bad(samples, last_good, cursor)
            if spec.group_batches:
                g = (b - first) // group
                rng = np.random.default_rng([spec.seed, epoch, spec.dp_rank, w, g])
                samples = [samples[i] for i in rng.permutation(len(samples))]
            for j in range(b, g_end):
                if j - first < skip:
                    continue
                rows = samples[(j - b) * bs : (j - b + 1) * bs]
                # numpy, not torch: a small tensor crosses the worker queue through a new
                # shared-memory segment (~1 ms); a pickled array costs a few microseconds.
                yield np.stack(rows), pending_bad
                pending_bad = 0
            b = g_end


def _fill_bad(samples: list, last_good: list, cursor: _ShardCursor) -> int:
    """Replace unreadable samples by readable ones (skip mode) so batch counts stay equal."""
    good = [s for s in samples if s is not None]
    bad = len(samples) - len(good)
    if bad:
        pool = good or last_good
        if not pool:
            bad_urls = [cursor.spec.urls[i] for i in sorted(cursor.bad)]
            raise ShardError(f"no readable samples to stand in for bad shards {bad_urls}")
        for i, j in enumerate(i for i, s in enumerate(samples) if s is None):
            samples[j] = pool[i % len(pool)]
    if good:
        last_good[:] = good[-1:]
    return bad


def _shard_url(manifest: Manifest, name: str, template: str | None) -> str:
    base = manifest.base
    if template is not None:
        return template.format(name=name, dir=base)
    return f"{base}/{name}"


def _as_is(item: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    """DataLoader would turn arrays into tensors inside the worker; keep them arrays."""
    return item


_LAYOUT_KEYS = ("split", "seed", "dp_size", "batch_size", "num_workers", "shuffle_buffer", "data")


class TokenWindowLoader:
    """Batches [batch_size, window] int64 of one split for one data-parallel rank.

    Train iterates forever (epoch after epoch); val makes one pass. `state_dict()` /
    `load_state_dict()` give exact resume. Pass the trainer's tokenizer identity and window
    (`tokenizer=`, `seq_len=`, `n_future=`) to turn a mismatch into an error.
    """

    def __init__(
        self,
        manifest_path: str | os.PathLike | Manifest,
        split: str,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        *,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        on_bad_shard: str = "error",
        tokenizer: Tokenizer | dict | None = None,
        seq_len: int | None = None,
        n_future: int | None = None,
        shard_url_template: str | None = None,
        verify_sha256: bool = True,
        timeout: float = 300.0,
    ) -> None:
        m = manifest_path if isinstance(manifest_path, Manifest) else Manifest.load(manifest_path)
        if split not in m.splits:
            raise ManifestError(f"{m.location}: no split {split!r} (has {sorted(m.splits)})")
        if on_bad_shard not in ("error", "skip"):
            raise ValueError(f"on_bad_shard must be 'error' or 'skip' (got {on_bad_shard!r})")
        if not (0 <= dp_rank < dp_size) or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"bad layout: dp_rank={dp_rank} dp_size={dp_size} batch_size={batch_size} "
                f"num_workers={num_workers}"
            )
        if tokenizer is not None and not isinstance(tokenizer, dict):
            tokenizer = tokenizer.identity()
        m.check_compatible(tokenizer, seq_len, n_future)
        info = m.splits[split]
        total, workers, train = info.samples, max(1, num_workers), split == "train"
        if train:
            rank_samples = total // dp_size
            batches = rank_samples // batch_size // workers * workers
        else:
            rank_samples = math.ceil(total / dp_size)
            batches = math.ceil(rank_samples / batch_size)
        if batches == 0:
            raise ManifestError(
                f"{m.location}: split {split!r} has {total} windows, too few for dp_size={dp_size}"
                f" x batch_size={batch_size}" + (f" x {workers} workers" if train else "")
            )
        self.manifest, self.split, self.num_workers, self.timeout = m, split, num_workers, timeout
        self.shuffle_buffer = shuffle_buffer
        shuffled = train and shuffle_buffer > 1
        self.spec = _Spec(
            urls=tuple(_shard_url(m, s.name, shard_url_template) for s in info.shards),
            counts=tuple(s.samples for s in info.shards),
            shas=tuple(s.sha256 for s in info.shards),
            sample_bytes=m.sample_bytes,
            first_keys=tuple(
                int(k) for k in np.cumsum([0] + [s.samples for s in info.shards])[:-1]
            ),
            dtype=m.dtype,
            window=m.window,
            train=train,
            batch_size=batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            workers=workers,
            seed=seed,
            group_batches=math.ceil(shuffle_buffer / batch_size) if shuffled else 0,
            batches=batches,
            rank_samples=rank_samples,
            on_bad_shard=on_bad_shard,
            verify_sha256=verify_sha256,
        )
        self.epoch = 0
        self.batches_in_epoch = 0
        self.bad_samples = 0
        """Samples that were unreadable and replaced (on_bad_shard='skip'), in this process."""

    def batches_per_epoch(self) -> int:
        """Batches per epoch on this rank - the same number on every rank."""
        return self.spec.batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        train = self.spec.train
        start_epoch, start_batch = (self.epoch, self.batches_in_epoch) if train else (0, 0)
        dataset = _WindowStream(self.spec, start_epoch, start_batch)
        if self.num_workers:
            source = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                timeout=self.timeout,
                collate_fn=_as_is,
                prefetch_factor=4,
            )
        else:
            source = dataset
        iterator = iter(source)
        try:
            for batch, n_bad in iterator:
                self.bad_samples += n_bad
                if train:
                    self.batches_in_epoch += 1
                    if self.batches_in_epoch == self.spec.batches:
                        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
                yield torch.from_numpy(batch.astype(np.int64))
        finally:
            # Stop DataLoader workers now rather than when the garbage collector finds the
            # iterator: after an error the traceback keeps it alive, and that late shutdown
            # was measured to stall ~5 s.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict:
        """Position and layout. All but the informational `next_reads` is the same on every
        rank, so any rank's copy can resume every rank."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "batches_per_epoch": self.spec.batches,
            "samples_consumed": self.batches_in_epoch * self.spec.batch_size,
            "seed": self.spec.seed,
            "dp_size": self.spec.dp_size,
            "batch_size": self.spec.batch_size,
            "num_workers": self.num_workers,
            "shuffle_buffer": self.shuffle_buffer,
            "data": hashlib.sha256("".join(self.spec.shas).encode()).hexdigest()[:16],
            "next_reads": self._next_reads(),
        }

    def _next_reads(self) -> list[dict]:
        """Where each worker slice resumes reading: (shard, sample) of its current group's
        first window. For people reading checkpoints; resuming needs only the counters."""
        spec, k = self.spec, self.batches_in_epoch if self.spec.train else 0
        group, out = spec.group_batches or 1, []
        for w in range(spec.workers):
            first, last = spec.worker_batches(w)
            done = k // spec.workers + (1 if w < k % spec.workers else 0)
            b = first + done - done % group
            if b < last:
                shard, sample, _ = spec.runs(
                    self.epoch, b * spec.batch_size, b * spec.batch_size + 1
                )[0]
                out.append(
                    {"slice": w, "shard": spec.urls[shard].rsplit("/", 1)[-1], "sample": sample}
                )
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue exactly where `state` was taken; the layout must match (the error names
        what differs). `strict=False` also accepts another dp_size, batch_size, num_workers or
        shuffle_buffer (an elastic restart): it keeps the epoch and the fraction of it already
        consumed - close, but not sample-exact."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION}")
        mine = self.state_dict()
        differs = [key for key in _LAYOUT_KEYS if state.get(key) != mine[key]]
        for key in differs:
            if strict or key in ("split", "seed", "data"):
                raise ValueError(
                    f"data loader state has {key}={state.get(key)!r} but this loader has "
                    f"{mine[key]!r}; exact resume needs the same data layout"
                )
        batches = int(state["batches_in_epoch"])
        if differs:
            batches = batches * self.spec.batches // int(state["batches_per_epoch"])
            log.warning("data layout changed (%s): resuming approximately", ", ".join(differs))
        if not 0 <= batches < self.spec.batches:
            raise ValueError(f"batches_in_epoch={batches} out of range")
        self.epoch, self.batches_in_epoch = int(state["epoch"]), batches
