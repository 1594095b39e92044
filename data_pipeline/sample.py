"""A bounded, deterministic sample of a corpus to train the tokenizer on (`mtp data tokenizer`).

A 300 GB corpus does not fit in memory, and sentencepiece keeps every sentence it is given. The
sample is at most `max_bytes` of the corpus, spread over all of it, and costs a read of only what
it takes:

    units = the build's listing: a file, or a ~4 MB line range of a JSONL file
    a fixed pseudo-random order of the units: sha256(seed, unit name, byte offset)
    in that order, take each unit whose size (known from the listing) still fits in max_bytes
    read the units taken, in listing order, with the build's rules (the same documents are
    used or skipped, JSONL gives its text field)

The sample depends on the listing and the seed only, not on the order of sources or a worker
count. One unit in memory at a time (at most Limits.max_file_bytes, or one JSONL range); what is
sampled is bounded by max_bytes because a document's text is never longer than its unit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .sources import Limits, Task, TaskResult, plan_tasks, task_documents


@dataclass
class SampleStats:
    """What a sample took, filled in while it is read."""

    listed_units: int = 0
    listed_bytes: int = 0
    units: int = 0
    """Units chosen."""
    unit_bytes: int = 0
    """Their size on disk: <= max_bytes."""
    documents: int = 0
    text_bytes: int = 0
    """UTF-8 bytes of the documents handed on: <= unit_bytes."""
    skipped: int = 0


def _key(task: Task, seed: int) -> bytes:
    name = f"{seed}\0{task.name}\0{task.start}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(name).digest()


def choose_units(tasks: Sequence[Task], max_bytes: int, seed: int, limits: Limits) -> list[Task]:
    """The units of the sample, in listing order (see the module docstring)."""
    order = sorted(range(len(tasks)), key=lambda i: _key(tasks[i], seed))
    left, chosen = max_bytes, []
    for i in order:
        size = tasks[i].size
        if size <= left and size <= limits.max_file_bytes:  # larger ones are skipped unread
            chosen.append(i)
            left -= size
    return [tasks[i] for i in sorted(chosen)]


def sample_texts(
    sources: Sequence[str | os.PathLike],
    include: Sequence[str],
    exclude: Sequence[str],
    max_bytes: int,
    *,
    seed: int = 0,
    limits: Limits | None = None,
    stats: SampleStats | None = None,
) -> Iterator[str]:
    """Texts of the documents of a sample of at most max_bytes of the corpus, one at a time."""
    limits = limits or Limits()
    stats = stats if stats is not None else SampleStats()
    tasks, _, _ = plan_tasks(sources, include, exclude)
    stats.listed_units, stats.listed_bytes = len(tasks), sum(t.size for t in tasks)
    chosen = choose_units(tasks, max_bytes, seed, limits)
    stats.units, stats.unit_bytes = len(chosen), sum(t.size for t in chosen)
    for task in chosen:
        result = TaskResult()
        for _, text in task_documents(task, limits, result):
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate from JSONL: the build skips it too
                stats.skipped += 1
                continue
            stats.documents += 1
            stats.text_bytes += size
            yield text
        stats.skipped += len(result.skips)
