"""Input side of the builder: which documents exist, and turning one task into token arrays.

A *task* is a unit of work for one worker process: a whole file (one document), or a byte range
of a JSONL file (one document per line). Listing happens in the parent in a fixed order (sources
as given, then a sorted depth-first walk), so the tasks - and therefore the shards - do not
depend on the number of workers.

Bad input never stops a build. Every document that is not used gets one of these reasons:

    unreadable          open/read failed (permission, broken symlink, symlink loop, I/O error)
    not_regular_file    a FIFO, socket or device (reading could block forever)
    too_large           larger than max_file_bytes (a whole-file document)
    empty               no bytes, or only whitespace
    binary              contains a NUL byte
    invalid_utf8        not valid UTF-8 (or, from JSONL, a string with lone surrogates)
    line_too_long       a line longer than max_line_bytes (minified or generated data)
    bad_json            a JSONL line that does not parse
    missing_text_field  a JSONL record without a string in the text field
    tokenize_error      the tokenizer raised
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtp_dist.tokenizers import Tokenizer

JSONL_SUFFIXES = (".jsonl",)
"""Files with these suffixes are read as JSON lines; any other file is one plain-text document."""


@dataclass(frozen=True)
class Limits:
    """Per-document acceptance limits, shared by every worker."""

    max_file_bytes: int = 16_000_000
    """A document larger than this is skipped as too_large."""
    max_line_bytes: int = 100_000
    """A document with a longer line is skipped as line_too_long."""
    text_field: str = "text"
    """The JSONL field holding the document text."""


@dataclass(frozen=True)
class Task:
    """One unit of work: a whole file, or a [start, end) byte range of a JSONL file."""

    kind: str  # "file" or "jsonl"
    path: str
    name: str  # how the skip list names it: the path as found under its source
    start: int = 0
    end: int = 0
    size: int = 0  # bytes, for progress and MB/s


@dataclass
class TaskResult:
    """What a worker hands back: documents in input order, plus what it skipped and why."""

    docs: list[tuple[bytes, np.ndarray]] = field(default_factory=list)  # (sha256, tokens)
    skips: list[tuple[str, str, str]] = field(default_factory=list)  # (name, reason, detail)
    bytes_in: int = 0
    files: int = 0


def glob_regex(pattern: str) -> re.Pattern:
    """Compile a path glob where `*` stays inside one directory and `**/` spans any depth."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


class _Matcher:
    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self.include = [glob_regex(p) for p in include]
        self.exclude = [glob_regex(p) for p in exclude]
        # "dir/**"-style excludes also prune the walk, so e.g. site-packages is never listed.
        self.prune = [glob_regex(p[:-3]) for p in exclude if p.endswith("/**")]

    def wants(self, rel: str) -> bool:
        return any(r.fullmatch(rel) for r in self.include) and not any(
            r.fullmatch(rel) for r in self.exclude
        )

    def prunes(self, rel_dir: str) -> bool:
        return any(r.fullmatch(rel_dir) for r in self.prune)


def _walk(root: Path, matcher: _Matcher, skips: list) -> Iterator[tuple[Path, str]]:
    def on_error(err: OSError) -> None:
        skips.append((str(err.filename), "unreadable", f"{type(err).__name__}: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        dirnames[:] = sorted(d for d in dirnames if not matcher.prunes(rel_dir + d))
        for name in sorted(filenames):
            rel = rel_dir + name
            if matcher.wants(rel):
                yield Path(dirpath, name), rel


def list_files(
    sources: Sequence[str | os.PathLike], include: Sequence[str], exclude: Sequence[str]
) -> list[Path]:
    """The files a build would read, in build order (e.g. to train a tokenizer on the same)."""
    tasks, _, _ = plan_tasks(sources, include, exclude)
    return [Path(t.path) for t in tasks if t.kind == "file" or t.start == 0]


def _jsonl_tasks(path: Path, size: int, chunk_bytes: int) -> list[Task]:
    """Split a JSONL file into line-aligned byte ranges of about chunk_bytes."""
    bounds = [0]
    try:
        with open(path, "rb") as f:
            while bounds[-1] + chunk_bytes < size:
                f.seek(bounds[-1] + chunk_bytes)
                f.readline()  # move to the start of the next line
                if f.tell() >= size:
                    break
                bounds.append(f.tell())
    except OSError:
        bounds = [0]  # one task; the worker reports why the file cannot be read
    bounds.append(size)
    return [
        Task("jsonl", str(path), str(path), start=a, end=b, size=b - a)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def plan_tasks(
    sources: Sequence[str | os.PathLike],
    include: Sequence[str],
    exclude: Sequence[str],
    *,
    jsonl_chunk_bytes: int = 4_000_000,
) -> tuple[list[Task], list[tuple[str, str, str]], str]:
    """(tasks in input order, entries skipped while listing, fingerprint of the listing).

    A directory source yields its files matching `include` and not `exclude` (globs relative to
    the directory); a `.jsonl` file yields line ranges; any other file is one document. The
    fingerprint hashes (name, size, mtime) of every listed file, so a changed corpus is noticed.
    """
    matcher = _Matcher(include, exclude)
    tasks: list[Task] = []
    skips: list[tuple[str, str, str]] = []
    fingerprint = hashlib.sha256()
    for source in map(Path, sources):
        if source.is_dir():
            entries = list(_walk(source, matcher, skips))
        elif source.exists() or source.is_symlink():
            entries = [(source, str(source))]
        else:
            skips.append((str(source), "unreadable", "no such file or directory"))
            continue
        for path, rel in entries:
            try:
                st = path.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1  # the worker reports why it cannot be read
            fingerprint.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            name = str(path) if rel == str(path) else f"{source}/{rel}"
            if path.suffix in JSONL_SUFFIXES and size > 0:
                tasks.extend(_jsonl_tasks(path, size, jsonl_chunk_bytes))
            else:
                tasks.append(Task("file", str(path), name, size=max(size, 0)))
    return tasks, skips, fingerprint.hexdigest()


def _problem(data: bytes, limits: Limits) -> str | None:
    """Why a document's bytes are not used, or None. Cheapest checks first."""
    if len(data) > limits.max_file_bytes:
        return "too_large"
    if not data.strip():
        return "empty"
    if b"\x00" in data:
        return "binary"
    if len(data) > limits.max_line_bytes and max(map(len, data.split(b"\n"))) > (
        limits.max_line_bytes
    ):
        return "line_too_long"
    return None


def _token_dtype(tokenizer: Tokenizer) -> type:
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32


def _add_document(
    result: TaskResult, name: str, text: str, tokenizer: Tokenizer, dtype: type
) -> None:
    try:
        data = text.encode("utf-8")
        ids = tokenizer.encode(text)
    except UnicodeEncodeError:
        result.skips.append((name, "invalid_utf8", "lone surrogate in text"))
        return
    except Exception as err:  # a tokenizer bug must not stop a long build; it is counted
        result.skips.append((name, "tokenize_error", f"{type(err).__name__}: {err}"))
        return
    result.docs.append((hashlib.sha256(data).digest(), np.asarray(ids, dtype=dtype)))


def _read_file(task: Task, limits: Limits) -> tuple[bytes | None, str, str]:
    """(bytes or None, reason, detail). Never blocks on FIFOs, never reads giant files whole."""
    try:
        st = os.stat(task.path)
        if not stat.S_ISREG(st.st_mode):
            return None, "not_regular_file", stat.filemode(st.st_mode)
        with open(task.path, "rb") as f:
            data = f.read(limits.max_file_bytes + 1)
    except OSError as err:
        detail = f"{type(err).__name__}: {err.strerror or err}"
        if os.path.islink(task.path) and not os.path.exists(task.path):
            detail += " (broken symlink)"
        return None, "unreadable", detail
    return data, "", ""


def process_task(task: Task, tokenizer: Tokenizer, limits: Limits) -> TaskResult:
    """Read, check and tokenize one task. Runs in a worker process; never raises on bad input."""
    result = TaskResult()
    dtype = _token_dtype(tokenizer)
    for name, text in task_documents(task, limits, result):
        _add_document(result, name, text, tokenizer, dtype)
    return result


def task_documents(task: Task, limits: Limits, result: TaskResult) -> Iterator[tuple[str, str]]:
    """(name, text) of every usable document of a task, in order. What is not usable goes to
    `result.skips` with its reason; files and bytes read are counted in `result`."""
    result.files += 1 if task.kind == "file" or task.start == 0 else 0
    if task.kind == "file":
        data, reason, detail = _read_file(task, limits)
        if data is None:
            result.skips.append((task.name, reason, detail))
            return
        result.bytes_in += len(data)
        reason = _problem(data, limits)
        if reason is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                reason, detail = "invalid_utf8", f"byte {err.start}"
        if reason is not None:
            result.skips.append((task.name, reason, detail))
            return
        yield task.name, text
        return

    try:
        with open(task.path, "rb") as f:
            f.seek(task.start)
            chunk = f.read(task.end - task.start)
    except OSError as err:
        result.skips.append((task.name, "unreadable", f"{type(err).__name__}: {err.strerror}"))
        return
    result.bytes_in += len(chunk)
    offset = task.start
    for line in chunk.split(b"\n"):
        name, offset = f"{task.path}@{offset}", offset + len(line) + 1
        if not line.strip():
            continue
        try:
            # decode first: json.loads(bytes) guesses UTF-16/32 from the first bytes
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            result.skips.append((name, "invalid_utf8", "JSONL line"))
            continue
        except ValueError as err:
            result.skips.append((name, "bad_json", str(err)[:80]))
            continue
        text = record.get(limits.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            result.skips.append((name, "missing_text_field", limits.text_field))
            continue
        reason = _problem(text.encode("utf-8", "surrogatepass"), limits)
        if reason is not None:
            result.skips.append((name, reason, ""))
            continue
        yield name, text
