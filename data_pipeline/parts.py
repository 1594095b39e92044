"""A build that scales out: `mtp data build --part I/N` tokenizes part I of N of a corpus, and
`mtp data merge PARTS... --out DIR` packs the parts into exactly the shards and manifest that a
one-machine `mtp data build` of the same corpus writes.

    every part lists the whole corpus (the same sorted listing a build makes)
      -> contiguous ranges of that listing's tasks, balanced by bytes: part I gets [lo, hi)
      -> part I tokenizes its range (worker processes, as a build), drops duplicates among its
         own documents, and writes
             tokens.bin  every kept document's tokens, one document after another
             docs.bin    per document: sha256 of its bytes (32 bytes), token count (int64)
             part.json   written last, atomically: the completion marker (PartInfo)
    merge: the parts in order 0..N-1 give the documents in listing order
      -> packing.Splitter, the code a one-machine build runs (global dedup, split, shuffle,
         windows, shards) -> manifest.json

Tokenizing is nearly all of a build's time, and it is what the parts share out. The merge cannot
reference the parts' data instead of writing shards: the one-machine layout has a document
shuffle and windows that run across every part boundary (docs/data.md says more).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from mtp_dist.files import write_atomic
from mtp_dist.tokenizers import Tokenizer

from .builder import (
    DEFAULT_SHARD_BYTES,
    build_config,
    check_options,
    progress_bar,
    special_ids,
    tokenized,
)
from .manifest import MANIFEST_NAME, MAX_SKIP_EXAMPLES, Manifest, ManifestError
from .packing import DEDUP_KEY_BYTES, Splitter, clear_previous, make_manifest, summary, token_dtype
from .sources import Limits, Task, plan_tasks

PART_FORMAT = "mtp_dist.token_part.v1"
PART_JSON = "part.json"
TOKENS_BIN = "tokens.bin"
DOCS_BIN = "docs.bin"
DOC_RECORD = np.dtype([("sha256", "u1", (32,)), ("tokens", "<i8")])
"""One docs.bin record: the sha256 of the document's bytes and its token count."""


class PartError(ManifestError):
    """Parts that cannot be merged: incomplete, missing, duplicated, or built differently."""


@dataclass
class PartInfo:
    """part.json: what a part holds and how it was built. Its presence marks a finished part."""

    part: int
    parts: int
    """This is part `part` of `parts` (0 <= part < parts)."""
    tasks: list[int]
    """[lo, hi): the range of the listing's tasks this part read."""
    listed_tasks: int
    """Tasks in the whole listing (the same number in every part of one build)."""
    tokenizer: dict
    special_ids: dict
    seq_len: int
    n_future: int
    dtype: str
    config: dict
    """The manifest's `config` (sources, globs, options, fingerprint of the whole listing)."""
    files: int
    bytes: int
    documents: int
    """Documents stored in this part (after dropping this part's own duplicates)."""
    tokens: int
    duplicates: int
    """Documents dropped as duplicates of an earlier document of this part."""
    listing_skips: dict
    """{"counts": {reason: n}, "entries": [[name, reason, detail], ...]} of the listing: the
    same in every part, counted once by the merge."""
    skips: dict
    """The same for this part's tasks (entries: the first MAX_SKIP_EXAMPLES, in input order)."""
    data: dict
    """{file name: {"bytes": n, "sha256": hex}} of tokens.bin and docs.bin."""
    format: str = PART_FORMAT

    @classmethod
    def load(cls, directory: Path) -> PartInfo:
        path = directory / PART_JSON
        if not directory.is_dir():
            raise PartError(f"part {directory}: no such directory")
        if not path.is_file():
            raise PartError(
                f"part {directory}: incomplete (no {PART_JSON}: its build did not finish)"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PartError(f"part {directory}: unreadable {PART_JSON} ({err})") from err
        if not isinstance(data, dict) or data.get("format") != PART_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise PartError(f"part {directory}: format {found!r}, expected {PART_FORMAT!r}")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            lacks, extra = sorted(names - set(data)), sorted(set(data) - names)
            raise PartError(f"part {directory}: {PART_JSON} lacks {lacks}, has unknown {extra}")
        return cls(**data)

    def save(self, directory: Path) -> None:
        """Atomically: a reader sees a whole part.json or none."""
        write_atomic(
            directory / PART_JSON, json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"
        )


def part_range(tasks: Sequence[Task], index: int, count: int, limits: Limits) -> tuple[int, int]:
    """[lo, hi) of the tasks part `index` of `count` reads: contiguous, balanced by bytes.

    A task weighs its size (capped at max_file_bytes: a larger file is skipped unread) plus one,
    so empty files count too. Task k goes to part floor(count * start_k / total), start_k being
    the weight before it: a pure function of the listing, so every part cuts the same ranges.
    """
    starts, total = [], 0
    for task in tasks:
        starts.append(total)
        total += min(task.size, limits.max_file_bytes) + 1
    # task k is in a part >= i  <=>  count * start_k >= i * total  <=>  start_k >= ceil(i * total
    # / count): two binary searches in the (sorted) starts
    lo = bisect_left(starts, -(-index * total // count))
    hi = bisect_left(starts, -(-(index + 1) * total // count))
    return lo, hi


class _HashedFile:
    """A file written sequentially, hashed and counted on the way."""

    def __init__(self, path: Path) -> None:
        self.file, self.sha, self.bytes = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def close(self) -> dict:
        self.file.close()
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


def _skip_record(skips: list[tuple[str, str, str]], counts: Counter) -> dict:
    return {"counts": dict(sorted(counts.items())), "entries": [list(s) for s in skips]}


def build_part(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    seq_len: int,
    n_future: int,
    *,
    part: tuple[int, int],
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
) -> PartInfo:
    """Tokenize part `part` = (I, N) of the corpus into out_dir; the options are `build_shards`'s
    and are recorded for the merge (which packs with them)."""
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part must be I/N with 0 <= I < N (got {index}/{count})")
    check_options(seq_len, n_future, val_fraction)
    limits = limits or Limits()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The marker goes first, so a directory never pairs an old marker with new data.
    for name in (PART_JSON, TOKENS_BIN, DOCS_BIN):
        (out / name).unlink(missing_ok=True)
    tasks, listing_skips, fingerprint = plan_tasks(sources, include, exclude)
    lo, hi = part_range(tasks, index, count, limits)
    mine = tasks[lo:hi]

    tokens_out, docs_out = _HashedFile(out / TOKENS_BIN), _HashedFile(out / DOCS_BIN)
    seen: set[bytes] = set()
    files = bytes_in = documents = n_tokens = duplicates = 0
    skips: list[tuple[str, str, str]] = []
    skip_counts: Counter = Counter()
    bar = progress_bar(sum(t.size for t in mine), f"data build {index}/{count}", progress)
    try:
        with tokenized(mine, tokenizer, limits, workers) as results:
            for task, result in zip(mine, results, strict=True):
                files += result.files
                bytes_in += result.bytes_in
                skip_counts.update(reason for _, reason, _ in result.skips)
                skips.extend(result.skips[: MAX_SKIP_EXAMPLES - len(skips)])
                for digest, tokens in result.docs:
                    # A later copy inside this part is one the merge would drop anyway (it keeps
                    # the first in listing order): dropping it here saves its tokens on disk.
                    if dedup:
                        key = digest[:DEDUP_KEY_BYTES]
                        if key in seen:
                            duplicates += 1
                            continue
                        seen.add(key)
                    tokens_out.write(tokens.tobytes())
                    docs_out.write(digest + len(tokens).to_bytes(8, "little"))
                    documents += 1
                    n_tokens += len(tokens)
                bar.update(task.size)
                bar.set_postfix(files=files, tokens=f"{n_tokens / 1e6:.2f}M", refresh=False)
    except BaseException:  # Ctrl-C (KeyboardInterrupt) included: no half-written part left
        bar.close()
        tokens_out.close()
        docs_out.close()
        for name in (TOKENS_BIN, DOCS_BIN):
            (out / name).unlink(missing_ok=True)
        raise
    bar.close()
    info = PartInfo(
        part=index,
        parts=count,
        tasks=[lo, hi],
        listed_tasks=len(tasks),
        tokenizer=tokenizer.identity(),
        special_ids=special_ids(tokenizer),
        seq_len=seq_len,
        n_future=n_future,
        dtype=token_dtype(tokenizer.vocab_size).name,
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
        files=files,
        bytes=bytes_in,
        documents=documents,
        tokens=n_tokens,
        duplicates=duplicates,
        listing_skips=_skip_record(
            listing_skips[:MAX_SKIP_EXAMPLES], Counter(r for _, r, _ in listing_skips)
        ),
        skips=_skip_record(skips, skip_counts),
        data={TOKENS_BIN: tokens_out.close(), DOCS_BIN: docs_out.close()},
    )
    info.save(out)
    if progress:
        seconds = time.perf_counter() - start
        skipped = ", ".join(f"{r}={n}" for r, n in info.skips["counts"].items()) or "none"
        print(
            f"data build part {index}/{count}: tasks [{lo}, {hi}) of {len(tasks)}, {files} files, "
            f"{bytes_in / 1e6:.1f} MB, {documents} documents, {n_tokens} tokens in "
            f"{seconds:.1f}s ({bytes_in / 1e6 / max(seconds, 1e-9):.1f} MB/s); duplicates "
            f"dropped: {duplicates}; skipped: {skipped}\n  part: {out}",
            file=sys.stderr,
        )
    return info


def _named(info: PartInfo) -> str:
    t = info.tokenizer
    return f"{t.get('kind')} (vocab {t.get('vocab_size')}, sha256 {str(t.get('sha256'))[:12]})"


def _differs(a: object, b: object, key: str) -> str:
    return f"{key}={json.dumps(a, sort_keys=True)} vs {json.dumps(b, sort_keys=True)}"


def check_parts(dirs: Sequence[Path], infos: Sequence[PartInfo]) -> None:
    """Raise PartError unless the parts are exactly 0..N-1 of one build (same listing, tokenizer
    and settings) with their data files intact in size."""
    if not infos:
        raise PartError("no parts given")
    ref, ref_dir = infos[0], dirs[0]
    for d, info in zip(dirs, infos, strict=True):
        if info.parts != ref.parts:
            raise PartError(
                f"mismatched N: {ref_dir} is part {ref.part}/{ref.parts} but {d} is part "
                f"{info.part}/{info.parts}"
            )
    by_index: dict[int, Path] = {}
    for d, info in zip(dirs, infos, strict=True):
        if info.part in by_index:
            raise PartError(
                f"part {info.part}/{info.parts} given twice: {by_index[info.part]} and {d}"
            )
        by_index[info.part] = d
    missing = sorted(set(range(ref.parts)) - set(by_index))
    if missing:
        listed = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise PartError(f"missing part(s) {listed} of {ref.parts} (got {len(by_index)} parts)")
    for d, info in zip(dirs, infos, strict=True):
        if info.tokenizer != ref.tokenizer or info.special_ids != ref.special_ids:
            raise PartError(
                f"parts built with different tokenizers: {ref_dir} has {_named(ref)}, "
                f"{d} has {_named(info)}; train one and pass it to every part"
            )
        if info.config.get("fingerprint") != ref.config.get("fingerprint"):
            raise PartError(
                f"parts listed different files: {ref_dir} and {d} (the corpus changed between "
                "their builds, or they read copies with other names, sizes or mtimes); rebuild"
            )
        for key in ("seq_len", "n_future", "dtype", "listed_tasks"):
            if getattr(info, key) != getattr(ref, key):
                what = _differs(getattr(ref, key), getattr(info, key), key)
                raise PartError(f"parts built with different settings: {ref_dir} vs {d}: {what}")
        for key in sorted(set(info.config) | set(ref.config)):
            if info.config.get(key) != ref.config.get(key):
                what = _differs(ref.config.get(key), info.config.get(key), key)
                raise PartError(f"parts built with different settings: {ref_dir} vs {d}: {what}")
    ordered = sorted(infos, key=lambda i: i.part)
    bounds = [ordered[0].tasks[0]] + [i.tasks[1] for i in ordered]
    cuts = [i.tasks[0] for i in ordered[1:]]
    if bounds[0] != 0 or bounds[-1] != ref.listed_tasks or cuts != bounds[1:-1]:
        raise PartError(f"the parts' task ranges do not cover the listing once: {bounds}")
    for d, info in zip(dirs, infos, strict=True):
        for name, record in info.data.items():
            path = d / name
            size = path.stat().st_size if path.is_file() else None
            if size != record["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise PartError(f"part {path}: {found}, {PART_JSON} records {record['bytes']}")


def _documents(directory: Path, info: PartInfo) -> Iterator[tuple[bytes, np.ndarray]]:
    """(sha256, tokens) of a part's documents in order; checks both files' sha256 on the way
    (docs.bin before the first document, tokens.bin after the last)."""
    docs_path, tokens_path = directory / DOCS_BIN, directory / TOKENS_BIN
    if info.documents == 0:  # numpy cannot map an empty file
        docs = np.zeros(0, dtype=DOC_RECORD)
    else:
        docs = np.memmap(docs_path, dtype=DOC_RECORD, mode="r")
    if hashlib.sha256(docs).hexdigest() != info.data[DOCS_BIN]["sha256"]:
        raise PartError(f"part {docs_path}: sha256 differs from {PART_JSON}'s")
    lengths = np.asarray(docs["tokens"])
    if len(docs) != info.documents or int(lengths.sum()) != info.tokens:
        raise PartError(f"part {docs_path}: does not match the counts in {PART_JSON}")
    sha = hashlib.sha256()
    dtype = np.dtype(info.dtype)
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if info.tokens else np.zeros(0, dtype)
    digests, offset = docs["sha256"], 0
    for i, n in enumerate(lengths.tolist()):
        piece = np.asarray(tokens[offset : offset + n])
        sha.update(piece)
        offset += n
        yield digests[i].tobytes(), piece
    if sha.hexdigest() != info.data[TOKENS_BIN]["sha256"]:
        raise PartError(f"part {tokens_path}: sha256 differs from {PART_JSON}'s")


def merge_parts(
    part_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, progress: bool = True
) -> Manifest:
    """Pack parts 0..N-1 of one build into out_dir: the shards and manifest.json that
    `build_shards` writes for the same corpus and options. Nothing is published (no manifest,
    no shards) if a part turns out bad on the way."""
    start = time.perf_counter()
    dirs = [Path(d) for d in part_dirs]
    infos = [PartInfo.load(d) for d in dirs]
    check_parts(dirs, infos)
    ordered = sorted(zip(infos, dirs, strict=True), key=lambda pair: pair[0].part)
    ref, cfg = ordered[0][0], ordered[0][0].config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous(out)
    dtype = np.dtype(ref.dtype)
    splitter = Splitter(
        out,
        dtype=dtype,
        seq_len=ref.seq_len,
        n_future=ref.n_future,
        eos=ref.special_ids["eos"],
        pad=ref.special_ids["pad"],
        seed=cfg["seed"],
        val_fraction=cfg["val_fraction"],
        dedup=cfg["dedup"],
        shard_bytes=cfg["shard_bytes"],
        shuffle_docs=cfg["shuffle_docs"],
    )
    bar = progress_bar(sum(i.tokens for i in infos), "data merge", progress, unit="tok")
    try:
        for info, directory in ordered:
            for digest, tokens in _documents(directory, info):
                splitter.add(digest, tokens)
                bar.update(len(tokens))
        splits = splitter.finish()
    except BaseException:
        bar.close()
        clear_previous(out)  # the shards written so far belong to no manifest
        raise
    bar.close()
    skip_counts = Counter(ref.listing_skips["counts"])
    skip_entries = [tuple(e) for e in ref.listing_skips["entries"]]
    for info, _ in ordered:
        skip_counts.update(info.skips["counts"])
        skip_entries += [tuple(e) for e in info.skips["entries"]]
    manifest = make_manifest(
        splitter,
        splits,
        tokenizer=ref.tokenizer,
        special_ids=ref.special_ids,
        seq_len=ref.seq_len,
        n_future=ref.n_future,
        dtype=dtype,
        files=sum(i.files for i in infos),
        bytes_in=sum(i.bytes for i in infos),
        duplicates=sum(i.duplicates for i in infos),
        skip_counts=skip_counts,
        skip_entries=skip_entries,
        config=cfg,
    )
    manifest.save(out / MANIFEST_NAME)
    seconds = time.perf_counter() - start
    tokens = sum(i.tokens for i in infos)
    manifest.build_stats = {
        "seconds": seconds,
        "mb_per_s": manifest.totals["bytes"] / 1e6 / max(seconds, 1e-9),  # of source text
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }
    summary(manifest, progress, "data merge")
    return manifest
