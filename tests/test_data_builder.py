"""Data builder: determinism, exact packing, dedup/split, bad inputs counted, reuse, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from timeouts import deadline
from webdataset import tariterators

from data_pipeline import (
    Limits,
    Manifest,
    ManifestError,
    build_shards,
    ensure_shards,
    glob_regex,
)
from data_pipeline.cli import main as data_cli
from data_pipeline.sources import plan_tasks, process_task
from mtp_dist.tokenizers import ByteTokenizer, train_sentencepiece

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ, NF = 32, 3


def _make_corpus(root: Path, n: int = 40) -> dict[str, str]:
    """Copy n real stdlib files into root/pkg (some nested); return {relative path: text}."""
    texts = {}
    files = sorted((STDLIB / "json").glob("*.py")) + sorted(STDLIB.glob("*.py"))
    for i, src in enumerate(p for p in files if p.stat().st_size < 12_000):
        if len(texts) == n:
            break
        rel = f"pkg/sub{i % 3}/m{i}.py" if i % 2 else f"pkg/m{i}.py"
        text = src.read_text(encoding="utf-8")
        if text.strip() and text not in texts.values():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text, encoding="utf-8")
            texts[rel] = text
    return texts


def _write_tree(root: Path, texts: dict[str, str]) -> None:
    """Write {relative path: text} under root."""
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, _make_corpus(root)


def _read_split(out: Path, manifest: Manifest, split: str) -> np.ndarray:
    """All windows of a split, in order, read with webdataset's tar iterators: (samples, W)."""
    rows = []
    for shard in manifest.splits[split].shards:
        with open(out / shard.name, "rb") as f:
            for sample in tariterators.group_by_keys(
                tariterators.tar_file_expander([{"url": shard.name, "stream": f}])
            ):
                rows.append(np.load(io.BytesIO(sample["tokens.npy"])))
    return np.stack(rows) if rows else np.zeros((0, manifest.window), dtype=np.int64)


def _documents(out: Path, manifest: Manifest, split: str, tok) -> list[str]:
    """Undo the packing: windows -> stream -> documents (split at EOS)."""
    windows = _read_split(out, manifest, split).astype(np.int64)
    info = manifest.splits[split]
    if len(windows) == 0:
        return []
    s = manifest.stride
    # consecutive windows overlap by n_future: the look-ahead is the next window's start
    assert (windows[:-1, s:] == windows[1:, : manifest.n_future]).all()
    stream = windows[:, :s].reshape(-1)
    tail = np.concatenate([stream, windows[-1, s:]])[info.stream_tokens :]
    assert (tail == manifest.special_ids["pad"]).all(), "padding only after the stream"
    assert len(tail) == info.pad_tokens
    stream = stream[: info.stream_tokens]
    assert stream[-1] == tok.eos_id
    cuts = np.flatnonzero(stream == tok.eos_id)
    assert len(cuts) == info.documents
    return [tok.decode(d.tolist()) for d in np.split(stream, cuts + 1)[:-1]]


def test_packing_loses_and_duplicates_no_token(corpus, tmp_path: Path):
    root, texts = corpus
    tok = ByteTokenizer()
    m = build_shards([root], tmp_path, tok, SEQ, NF, val_fraction=0.25, workers=1, progress=False)
    assert (m.window, m.stride, m.dtype) == (SEQ + NF, SEQ, "uint16")
    train, val = (_documents(tmp_path, m, s, tok) for s in ("train", "val"))
    assert train and val, "both splits get documents"
    assert not set(train) & set(val), "the split is by document"
    assert Counter(train + val) == Counter(texts.values())
    stream_tokens = sum(len(tok.encode(t)) + 1 for t in texts.values())
    assert sum(sp.stream_tokens for sp in m.splits.values()) == stream_tokens
    assert m.totals["tokens"] + m.totals["documents"] == stream_tokens
    for split in m.splits.values():  # every stream token is an input exactly once
        assert split.samples == -(-split.stream_tokens // SEQ)
        assert sum(s.tokens for s in split.shards) == split.samples * m.window


def test_deterministic_across_runs_and_worker_counts(corpus, tmp_path: Path):
    root, _ = corpus
    tok = ByteTokenizer()
    kw = dict(shard_bytes=60_000, val_fraction=0.2, progress=False)
    a = build_shards([root], tmp_path / "a", tok, SEQ, NF, workers=1, **kw)
    b = build_shards([root], tmp_path / "b", tok, SEQ, NF, workers=2, **kw)
    c = build_shards([root], tmp_path / "c", tok, SEQ, NF, workers=2, **kw)
    assert len(a.splits["train"].shards) > 2
    assert a.to_json() == b.to_json() == c.to_json()
    for shard in a.splits["train"].shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (
            tmp_path / "b" / shard.name
        ).read_bytes()
    other_seed = build_shards([root], tmp_path / "d", tok, SEQ, NF, workers=2, seed=1, **kw)
    assert other_seed.splits["train"].shards[0].sha256 != a.splits["train"].shards[0].sha256


def test_shard_sizes_and_hashes_match_manifest(corpus, tmp_path: Path):
    root, _ = corpus
    m = build_shards([root], tmp_path, ByteTokenizer(), SEQ, NF, shard_bytes=50_000, progress=False)
    shards = m.splits["train"].shards
    assert len(shards) >= 3
    for shard in shards:
        path = tmp_path / shard.name
        assert shard.bytes == path.stat().st_size
        assert shard.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard.tokens == shard.samples * m.window
    for shard in shards[:-1]:  # closed once past the target, so at most one sample over
        assert 50_000 <= shard.bytes <= 50_000 + m.sample_bytes + 10_240
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["totals"]["documents"] == m.totals["documents"]


def test_small_corpus_still_gets_one_val_document(corpus, tmp_path: Path):
    root, texts = corpus
    tok = ByteTokenizer()
    tiny = build_shards([root], tmp_path / "a", tok, SEQ, NF, val_fraction=1e-9, progress=False)
    assert (tiny.splits["val"].documents, tiny.splits["train"].documents) == (1, len(texts) - 1)
    none = build_shards([root], tmp_path / "b", tok, SEQ, NF, val_fraction=0.0, progress=False)
    assert none.splits["val"].documents == 0
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("only document\n")
    single = build_shards([one_doc], tmp_path / "c", tok, SEQ, NF, progress=False)
    assert (single.splits["train"].documents, single.splits["val"].documents) == (1, 0)


def test_dedup_by_exact_content(corpus, tmp_path: Path):
    root, texts = corpus
    src = tmp_path / "src"
    _write_tree(src, texts)
    first = next(iter(texts))
    (src / "copy_of_first.py").write_text(texts[first])
    kw = dict(val_fraction=0.0, workers=1, progress=False)
    m = build_shards([src], tmp_path / "dedup", ByteTokenizer(), SEQ, NF, **kw)
    assert m.totals["duplicates"] == 1 and m.totals["documents"] == len(texts)
    m2 = build_shards([src], tmp_path / "all", ByteTokenizer(), SEQ, NF, dedup=False, **kw)
    assert m2.totals["duplicates"] == 0 and m2.totals["documents"] == len(texts) + 1


def test_bad_inputs_are_counted_and_never_stop_the_build(corpus, tmp_path: Path):
    root, texts = corpus
    src = tmp_path / "src"
    _write_tree(src, dict(list(texts.items())[:5]))
    (src / "empty.py").write_bytes(b"")
    (src / "blank.py").write_bytes(b"  \n\n\t\n")
    (src / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (src / "blob.py").write_bytes(b"x = 1\n\x00\x01\x02binary\n")
    (src / "minified.py").write_bytes(b"x=[" + b"1," * 60_000 + b"]\n")
    (src / "huge.py").write_bytes(b"# big\n" * 40_000)
    (src / "dangling.py").symlink_to(src / "does_not_exist.py")
    (src / "loop.py").symlink_to(src / "loop.py")
    os.mkfifo(src / "pipe.py")
    (src / "notes.txt").write_text("not matched by the include glob\n")
    limits = Limits(max_file_bytes=200_000, max_line_bytes=100_000)
    with deadline(30):
        m = build_shards(
            [src, tmp_path / "missing_dir"],
            tmp_path / "out",
            ByteTokenizer(),
            SEQ,
            NF,
            limits=limits,
            workers=2,
            progress=False,
        )
    expected = {
        "empty": 2,
        "invalid_utf8": 1,
        "binary": 1,
        "line_too_long": 1,
        "too_large": 1,
        "unreadable": 3,  # broken symlink, symlink loop, missing source
        "not_regular_file": 1,
    }
    assert m.totals["skipped"] == expected
    assert m.totals["documents"] == 5
    reasons = {(Path(e["name"]).name, e["reason"]) for e in m.skipped}
    for item in [
        ("dangling.py", "unreadable"),
        ("loop.py", "unreadable"),
        ("pipe.py", "not_regular_file"),
        ("latin1.py", "invalid_utf8"),
        ("minified.py", "line_too_long"),
        ("missing_dir", "unreadable"),
    ]:
        assert item in reasons
    assert any("broken symlink" in e["detail"] for e in m.skipped)
    saved = Manifest.load(tmp_path / "out")
    assert saved.totals["skipped"] == expected and len(saved.skipped) == sum(expected.values())


def test_permission_denied(tmp_path: Path):
    """chmod 000 blocks reads except for root (tests often run as root): both cases checked."""
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "secret.py").write_text("y = 2\n")
    (tmp_path / "secret.py").chmod(0)
    m = build_shards([tmp_path], tmp_path / "out", ByteTokenizer(), SEQ, NF, progress=False)
    if os.geteuid() == 0:
        assert m.totals["skipped"] == {} and m.totals["documents"] == 2
    else:
        assert m.totals["skipped"] == {"unreadable": 1} and m.totals["documents"] == 1


def test_jsonl_and_text_sources(tmp_path: Path):
    lines = [
        json.dumps({"text": "def a():\n    return 1\n", "id": 1}),
        "",
        json.dumps({"text": "print('中文 😀')\n"}),
        "{not json",
        json.dumps({"content": "wrong field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "lone \ud800 surrogate"}),
        json.dumps({"text": "x = 'ok'\n"}),
    ]
    data = "\n".join(lines).encode() + b"\n\xff\xfe broken utf8\n"
    (tmp_path / "docs.jsonl").write_bytes(data)
    (tmp_path / "plain.txt").write_text("a plain text document\n")
    tok = ByteTokenizer()
    m = build_shards(
        [tmp_path / "docs.jsonl", tmp_path / "plain.txt"],
        tmp_path / "out",
        tok,
        SEQ,
        NF,
        val_fraction=0.0,
        progress=False,
    )
    assert m.totals["skipped"] == {
        "bad_json": 1,
        "missing_text_field": 2,
        "empty": 1,
        "invalid_utf8": 2,
    }
    docs = _documents(tmp_path / "out", m, "train", tok)
    assert Counter(docs) == Counter(
        ["def a():\n    return 1\n", "print('中文 😀')\n", "x = 'ok'\n", "a plain text document\n"]
    )


def test_jsonl_chunks_cover_every_line_once(tmp_path: Path):
    path = tmp_path / "big.jsonl"
    texts = [f"doc {i}: " + "y" * (i % 50) for i in range(500)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tasks, skips, _ = plan_tasks([path], ["**/*"], [], jsonl_chunk_bytes=1000)
    assert len(tasks) > 10 and not skips
    assert tasks[0].start == 0 and tasks[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(tasks, tasks[1:], strict=False))
    tok = ByteTokenizer()
    got = [tok.decode(d.tolist()) for t in tasks for _, d in process_task(t, tok, Limits()).docs]
    assert got == texts


def test_glob_semantics():
    py = glob_regex("**/*.py")
    assert py.fullmatch("a.py") and py.fullmatch("x/y/a.py") and not py.fullmatch("a.pyc")
    assert not glob_regex("*.py").fullmatch("x/a.py")
    test_dirs = glob_regex("**/test/**")
    assert test_dirs.fullmatch("test/a.py") and test_dirs.fullmatch("x/test/b/c.py")
    assert not test_dirs.fullmatch("x/testing/a.py")
    assert glob_regex("m[0-9].py").fullmatch("m7.py") and not glob_regex("m[!0-9].py").fullmatch(
        "m7.py"
    )


def test_include_exclude_and_pruning(corpus, tmp_path: Path):
    root, texts = corpus
    m = build_shards(
        [root],
        tmp_path,
        ByteTokenizer(),
        SEQ,
        NF,
        exclude=["pkg/sub1/**"],
        val_fraction=0.0,
        progress=False,
    )
    kept = [t for rel, t in texts.items() if not rel.startswith("pkg/sub1/")]
    assert m.totals["documents"] == len(kept) < len(texts)


def test_ensure_shards_reuses_and_rebuilds(corpus, tmp_path: Path):
    root, texts = corpus
    src = tmp_path / "src"
    _write_tree(src, texts)
    out = tmp_path / "out"
    kw = dict(progress=False, workers=1)
    first = ensure_shards([src], out, ByteTokenizer(), SEQ, NF, **kw)
    assert first.build_stats  # built
    again = ensure_shards([src], out, ByteTokenizer(), SEQ, NF, **kw)
    assert not again.build_stats and again == first  # reused, not rebuilt
    assert ensure_shards([src], out, ByteTokenizer(), SEQ + 1, NF, **kw).build_stats
    assert ensure_shards([src], out, ByteTokenizer(), SEQ + 1, NF, seed=3, **kw).build_stats
    (src / "pkg" / "new.py").write_text("added = True\n")
    rebuilt = ensure_shards([src], out, ByteTokenizer(), SEQ + 1, NF, seed=3, **kw)
    assert rebuilt.build_stats and rebuilt.totals["documents"] == len(texts) + 1


def test_rebuild_removes_stale_shards(corpus, tmp_path: Path):
    root, _ = corpus
    many = build_shards(
        [root], tmp_path, ByteTokenizer(), SEQ, NF, shard_bytes=30_000, progress=False
    )
    few = build_shards([root], tmp_path, ByteTokenizer(), SEQ, NF, progress=False)
    assert len(many.splits["train"].shards) > len(few.splits["train"].shards) == 1
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(
        s.name for sp in few.splits.values() for s in sp.shards
    )


class _InterruptedAfter(ByteTokenizer):
    """A tokenizer during whose `n`-th document Ctrl-C arrives."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def encode(self, text: str) -> list[int]:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().encode(text)


def test_an_interrupted_build_leaves_no_shard(corpus, tmp_path: Path):
    """Stopped half-way, a build takes its shards with it: only a complete build (with its
    manifest) has any, so nothing half-made is ever read or reused. (tests/test_interrupts.py
    sends the real signal to a build with worker processes.)"""
    root, texts = corpus
    # shuffle_docs=1: documents go to the shards as they come, not after a shuffle buffer
    kw = dict(shard_bytes=10_000, val_fraction=0.2, shuffle_docs=1, progress=False, workers=1)
    with pytest.raises(KeyboardInterrupt):
        build_shards([root], tmp_path, _InterruptedAfter(len(texts) // 2), SEQ, NF, **kw)
    assert not list(tmp_path.glob("*.tar")) and not (tmp_path / "manifest.json").exists()
    assert ensure_shards([root], tmp_path, ByteTokenizer(), SEQ, NF, **kw).build_stats


def test_sentencepiece_build_round_trips(corpus, tmp_path: Path):
    root, texts = corpus
    tok = train_sentencepiece([Path(root, r) for r in texts], tmp_path / "tok", vocab_size=500)
    m = build_shards([root], tmp_path / "out", tok, SEQ, NF, val_fraction=0.0, progress=False)
    assert m.tokenizer == tok.identity()
    assert Counter(_documents(tmp_path / "out", m, "train", tok)) == Counter(texts.values())


def test_manifest_compatibility_errors(corpus, tmp_path: Path):
    root, _ = corpus
    m = build_shards([root], tmp_path, ByteTokenizer(), SEQ, NF, progress=False)
    m.check_compatible(ByteTokenizer().identity(), SEQ, NF)
    with pytest.raises(ManifestError, match="tokenizer"):
        m.check_compatible({"kind": "sentencepiece", "vocab_size": 4096, "sha256": "x"})
    with pytest.raises(ManifestError, match="seq_len"):
        m.check_compatible(seq_len=SEQ * 2)
    with pytest.raises(ManifestError, match="n_future"):
        m.check_compatible(seq_len=SEQ, n_future=NF + 1)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ManifestError, match="format"):
        Manifest.load(tmp_path)


def test_cli_build(corpus, tmp_path: Path):
    root, texts = corpus
    rc = data_cli(
        [
            "data",
            "build",
            str(root),
            "--out",
            str(tmp_path),
            "--bytes",
            "--seq-len",
            "16",
            "--n-future",
            "2",
            "--exclude",
            "pkg/sub0/**",
            "--workers",
            "2",
            "--val-fraction",
            "0.1",
            "--shard-mb",
            "0.05",
            "--quiet",
        ]
    )
    assert rc == 0
    m = Manifest.load(tmp_path / "manifest.json")
    assert (m.seq_len, m.n_future, m.config["exclude"]) == (16, 2, ["pkg/sub0/**"])
    assert m.totals["documents"] == sum(not r.startswith("pkg/sub0/") for r in texts)
    assert len(m.splits["train"].shards) > 1
