"""The shard builder (`mtp data build`): documents -> tokens -> windows -> webdataset shards.

    tasks (sorted listing) --workers--> tokens per document, in input order (Pool.imap)
      -> exact-content dedup -> train/val by a seeded hash of the content
      -> a seeded document shuffle buffer -> one token stream per split: doc EOS doc EOS ...
      -> windows of seq_len + n_future tokens every seq_len tokens -> webdataset tar shards
      -> manifest.json (written last, atomically)

Interrupted (Ctrl-C) or failed, a build leaves no shard behind: only a complete build has any.

Tokenizing happens here; everything from dedup on is `packing.Splitter`, shared with the merge
of parts (parts.py). Everything after the listing is a pure function of the input bytes and the
seed, so the output is byte-identical for any number of workers (and of parts).
"""

from __future__ import annotations

import dataclasses
import fcntl
import inspect
import logging
import multiprocessing
import os
import signal
import sys
import sysconfig
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from mtp_dist.tokenizers import Tokenizer

from .manifest import MANIFEST_NAME, Manifest
from .packing import Splitter, clear_previous, make_manifest, summary, token_dtype
from .sources import Limits, Task, TaskResult, plan_tasks, process_task

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 32_000_000
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


# ------------------------------------------------------------------ worker processes

_worker_state: tuple[Tokenizer, Limits] | None = None


def _init_worker(tokenizer: Tokenizer, limits: Limits) -> None:
    global _worker_state
    # Ctrl-C reaches every process of the terminal's foreground group. The parent stops the
    # build (it terminates the pool and removes the partial output); a worker that took it too
    # would print a traceback of its own, from wherever it was in the pool's locks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state = (tokenizer, limits)


def _run_tasks(tasks: list[Task]) -> list[TaskResult]:
    assert _worker_state is not None
    return [process_task(task, *_worker_state) for task in tasks]


@contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """While the pool runs: Ctrl-C sets the event instead of raising KeyboardInterrupt wherever
    the main thread is. Raised inside the pool's own locking (waiting for a result), it has
    left a lock held and hung the pool's shutdown, or released twice ('release unlocked
    lock'); `_results` raises it where no lock is held. Off the main thread, or where SIGINT
    already has another handler, nothing changes."""
    event = threading.Event()
    ours = threading.current_thread() is threading.main_thread()
    ours = ours and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _results(pending, interrupted: threading.Event, poll_s: float = 0.1) -> Iterator[TaskResult]:
    """The results of `pending` (the pool's lists of results, in order) one by one; after
    Ctrl-C, KeyboardInterrupt from here within `poll_s`."""
    while True:
        if interrupted.is_set():
            raise KeyboardInterrupt
        try:
            batch = pending.next(timeout=poll_s)
        except multiprocessing.TimeoutError:
            continue
        except StopIteration:
            return
        yield from batch


@contextmanager
def tokenized(
    tasks: list[Task], tokenizer: Tokenizer, limits: Limits, workers: int
) -> Iterator[Iterable[TaskResult]]:
    """Task results in task order, computed in `workers` processes (in-process if <= 1).
    Ctrl-C stops the workers quietly (they ignore it; the pool is terminated) and raises
    KeyboardInterrupt in the caller's loop."""
    if workers <= 1 or len(tasks) <= 1:
        yield (process_task(t, tokenizer, limits) for t in tasks)
        return
    # spawn, not fork: the caller (the trainer) has torch, tqdm's monitor and other threads
    # running, and a forked child can inherit a lock one of them held -- it hung here once.
    ctx = multiprocessing.get_context("spawn")
    # Tasks go out in lists, one list per imap item: imap's own chunking returns a generator,
    # whose next() cannot wait with a timeout.
    n = max(1, min(16, len(tasks) // (8 * workers)))
    batches = [tasks[i : i + n] for i in range(0, len(tasks), n)]
    with _deferred_interrupt() as interrupted:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, limits)) as pool:
            yield _results(pool.imap(_run_tasks, batches), interrupted)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B") -> tqdm:
    """The progress bar of a build (bytes read) or a merge (tokens packed), on stderr."""
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        unit_divisor=1000,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        smoothing=0.1,
    )


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The manifest's `special_ids`: what the reader and trainer need to know of the tokenizer."""
    return {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}


def build_config(sources: Sequence, fingerprint: str, **options) -> dict:
    """The manifest's record of how it was built; `ensure_shards` compares it to decide reuse."""
    limits = options.pop("limits") or Limits()
    return {
        "sources": [str(s) for s in sources],
        **{k: list(v) if isinstance(v, tuple | list) else v for k, v in options.items()},
        "limits": dataclasses.asdict(limits),
        "fingerprint": fingerprint,
    }


def check_options(seq_len: int, n_future: int, val_fraction: float) -> None:
    if seq_len < 1 or n_future < 1:
        raise ValueError(f"seq_len and n_future must be >= 1 (got {seq_len}, {n_future})")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")


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
    check_options(seq_len, n_future, val_fraction)
    limits = limits or Limits()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous(out)
    tasks, skips, fingerprint = plan_tasks(sources, include, exclude)

    dtype = token_dtype(tokenizer.vocab_size)
    splitter = Splitter(
        out,
        dtype=dtype,
        seq_len=seq_len,
        n_future=n_future,
        eos=tokenizer.eos_id,
        pad=tokenizer.pad_id,
        seed=seed,
        val_fraction=val_fraction,
        dedup=dedup,
        shard_bytes=shard_bytes,
        shuffle_docs=shuffle_docs,
    )
    files = bytes_in = 0
    bar = progress_bar(sum(t.size for t in tasks), "data build", progress)
    try:
        with tokenized(tasks, tokenizer, limits, workers) as results:
            for task, result in zip(tasks, results, strict=True):
                files += result.files
                bytes_in += result.bytes_in
                skips.extend(result.skips)
                for digest, tokens in result.docs:
                    splitter.add(digest, tokens)
                bar.update(task.size)
                bar.set_postfix(files=files, tokens=f"{splitter.tokens / 1e6:.2f}M", refresh=False)
        splits = splitter.finish()
    except BaseException:  # Ctrl-C (KeyboardInterrupt) included: the shards so far go
        bar.close()
        clear_previous(out)
        raise
    bar.close()
    manifest = make_manifest(
        splitter,
        splits,
        tokenizer=tokenizer.identity(),
        special_ids=special_ids(tokenizer),
        seq_len=seq_len,
        n_future=n_future,
        dtype=dtype,
        files=files,
        bytes_in=bytes_in,
        duplicates=0,
        skip_counts=Counter(reason for _, reason, _ in skips),
        skip_entries=skips,
        config=build_config(
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
    summary(manifest, progress)
    return manifest


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
        config = build_config(sources, fingerprint, **options)
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
