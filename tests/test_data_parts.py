"""A build scaled out: `--part I/N` + `mtp data merge` equal the one-machine build byte for byte;
a part is deterministic; bad sets of parts are one-line errors; the tokenizer sample is bounded."""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
import tracemalloc
from pathlib import Path

import pytest
import torch

from data_pipeline import (
    Limits,
    PartError,
    PartInfo,
    TokenWindowLoader,
    build_part,
    build_shards,
    merge_parts,
    sample_texts,
)
from data_pipeline.parts import DOCS_BIN, PART_JSON, TOKENS_BIN, part_range
from data_pipeline.sample import SampleStats
from data_pipeline.sources import plan_tasks
from mtp_dist.cli import main as mtp_main
from mtp_dist.tokenizers import ByteTokenizer, load_tokenizer, train_sentencepiece
from mtp_dist.tokenizers.spm import _iter_lines

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ, NF = 32, 3
OPTIONS = dict(shard_bytes=40_000, val_fraction=0.2, workers=1, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~50 real files with duplicates far apart in the listing (so they land in different parts),
    a JSONL source, bad inputs, and a missing source in the listing."""
    root = tmp_path_factory.mktemp("corpus")
    files = [p for p in sorted((STDLIB / "email").glob("*.py")) if p.stat().st_size < 20_000]
    files += sorted((STDLIB / "json").glob("*.py"))
    files += [p for p in sorted(STDLIB.glob("*.py")) if p.stat().st_size < 6_000][:30]
    for i, src in enumerate(files):
        sub = root / "ab"[i % 2]
        sub.mkdir(exist_ok=True)
        shutil.copy(src, sub / f"m{i:02d}.py")
    texts = [p.read_text() for p in sorted(root.rglob("*.py"))]
    (root / "z").mkdir()
    (root / "z/copy_of_first.py").write_text(texts[0])  # first in the listing, copied last
    (root / "b/copy_inside.py").write_text(texts[len(texts) // 2])
    (root / "z/empty.py").write_text("")
    (root / "z/blob.py").write_bytes(b"x\x00y")
    lines = [json.dumps({"text": t}) for t in ("def f():\n    pass\n", texts[3], "s = 'é'\n")]
    (root / "docs.jsonl").write_text("\n".join([*lines, "{broken"]) + "\n")
    return root


def sources(corpus: Path) -> list[Path]:
    return [corpus, corpus / "docs.jsonl", corpus / "not_there"]


def build_parts(corpus: Path, base: Path, count: int, **kw) -> list[Path]:
    dirs = [base / f"part-{i:03d}" for i in range(count)]
    for i, d in enumerate(dirs):
        build_part(sources(corpus), d, ByteTokenizer(), SEQ, NF, part=(i, count), **kw)
    return dirs


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def epoch(manifest: Path, split: str) -> list[torch.Tensor]:
    loader = TokenWindowLoader(manifest, split, 4, 0, 1, seed=3, num_workers=0)
    return [b for _, b in zip(range(loader.batches_per_epoch()), loader, strict=False)]


@pytest.mark.parametrize(
    "count, options",
    [
        (1, {}),
        (3, {}),
        (4, {"val_fraction": 1e-9}),  # val = the one held-back document, from whichever part
        (3, {"dedup": False}),
        (70, {}),  # more parts than files: some parts are empty
    ],
)
def test_merged_parts_equal_the_one_machine_build(corpus, tmp_path, count, options):
    kw = {**OPTIONS, **options}
    one = build_shards(sources(corpus), tmp_path / "one", ByteTokenizer(), SEQ, NF, **kw)
    dirs = build_parts(corpus, tmp_path / "parts", count, **kw)
    random.Random(count).shuffle(dirs)  # the merge orders parts itself
    merged = merge_parts(dirs, tmp_path / "merged", progress=False)

    assert merged.to_json() == one.to_json()
    assert files_of(tmp_path / "merged") == files_of(tmp_path / "one")  # manifest and shards
    assert len(one.splits["train"].shards) > 2 and one.splits["val"].documents >= 1
    assert one.totals["skipped"] == {"bad_json": 1, "binary": 1, "empty": 1, "unreadable": 1}
    parts = [PartInfo.load(d) for d in dirs]
    if kw.get("dedup", True):
        assert one.totals["duplicates"] == 3
        if count >= 3:  # the merge itself dropped a copy that lives in another part
            assert sum(p.duplicates for p in parts) < one.totals["duplicates"]
    if count == 70:
        assert any(p.documents == 0 for p in parts)
    for split in ("train", "val"):
        got, want = epoch(tmp_path / "merged", split), epoch(tmp_path / "one", split)
        assert len(got) == len(want) > 0
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_part_is_deterministic(corpus, tmp_path):
    a, b, c = (tmp_path / x for x in "abc")
    kw = dict(part=(1, 3), **OPTIONS)
    build_part(sources(corpus), a, ByteTokenizer(), SEQ, NF, **kw)
    build_part(sources(corpus), b, ByteTokenizer(), SEQ, NF, **kw)
    build_part(sources(corpus), c, ByteTokenizer(), SEQ, NF, **{**kw, "workers": 2})
    assert files_of(a) == files_of(b) == files_of(c)
    assert set(files_of(a)) == {PART_JSON, TOKENS_BIN, DOCS_BIN}
    info = PartInfo.load(a)
    assert info.documents > 0 and info.data[TOKENS_BIN]["bytes"] == 2 * info.tokens  # uint16


def test_part_ranges_tile_the_listing_balanced_by_bytes(corpus):
    tasks, _, _ = plan_tasks(sources(corpus), ["**/*.py"], [])
    limits = Limits()
    weights = [min(t.size, limits.max_file_bytes) + 1 for t in tasks]
    for count in (1, 2, 5, 13, 200):
        ranges = [part_range(tasks, i, count, limits) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == len(tasks)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        target = sum(weights) / count
        for lo, hi in ranges:  # each part within one task of its share
            assert abs(sum(weights[lo:hi]) - target) <= max(weights)


def mtp(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `mtp ARGS`, run in this process."""
    try:
        code = mtp_main(list(args))
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def one_line(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


@pytest.fixture(scope="module")
def three_parts(corpus, tmp_path_factory) -> list[Path]:
    return build_parts(corpus, tmp_path_factory.mktemp("three"), 3, **OPTIONS)


def copy_parts(dirs: list[Path], base: Path) -> list[Path]:
    out = [base / d.name for d in dirs]
    for src, dst in zip(dirs, out, strict=True):
        shutil.copytree(src, dst)
    return out


def test_merge_errors_are_one_line(capsys, corpus, three_parts, tmp_path):
    p0, p1, p2 = copy_parts(three_parts, tmp_path)
    out = str(tmp_path / "out")

    def merge(*dirs: Path) -> str:
        code, err = mtp(capsys, "data", "merge", *map(str, dirs), "--out", out)
        assert code == 2
        return err

    one_line(merge(p0, p2), "missing part(s) 1 of 3")
    one_line(merge(p0, p1, p2, p1), "part 1/3 given twice")
    one_line(merge(p0, p1, tmp_path / "nope"), "no such directory")
    other_n = tmp_path / "n2"
    build_part(sources(corpus), other_n, ByteTokenizer(), SEQ, NF, part=(1, 2), **OPTIONS)
    one_line(merge(p0, other_n, p2), "mismatched N")
    seed = tmp_path / "seed"
    build_part(sources(corpus), seed, ByteTokenizer(), SEQ, NF, part=(1, 3), **OPTIONS, seed=9)
    one_line(merge(p0, seed, p2), "different settings")
    window = tmp_path / "window"
    build_part(sources(corpus), window, ByteTokenizer(), SEQ * 2, NF, part=(1, 3), **OPTIONS)
    one_line(merge(p0, window, p2), "seq_len=32 vs 64")
    (p1 / PART_JSON).unlink()  # a part whose build died: data, but no completion marker
    one_line(merge(p0, p1, p2), "incomplete")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_merge_refuses_another_tokenizer(capsys, corpus, three_parts, tmp_path):
    texts = [p.read_text() for p in sorted(corpus.rglob("*.py"))]
    sp = train_sentencepiece(texts, tmp_path / "sp", vocab_size=600)
    other = tmp_path / "sp-part"
    build_part(sources(corpus), other, sp, SEQ, NF, part=(2, 3), **OPTIONS)
    code, err = mtp(capsys, "data", "merge", *map(str, three_parts[:2]), str(other), "--out",
                    str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    one_line(err, "parts built with different tokenizers")


def test_merge_refuses_parts_of_a_changed_corpus(capsys, corpus, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    first = tmp_path / "p0"
    build_part([src], first, ByteTokenizer(), SEQ, NF, part=(0, 2), **OPTIONS)
    (src / "a/added.py").write_text("x = 1\n")  # the corpus changes between the two parts
    build_part([src], tmp_path / "p1", ByteTokenizer(), SEQ, NF, part=(1, 2), **OPTIONS)
    code, err = mtp(capsys, "data", "merge", str(first), str(tmp_path / "p1"), "--out",
                    str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    one_line(err, "parts listed different files")


@pytest.mark.parametrize("damage", ["flip", "truncate_docs"])
def test_damaged_part_publishes_nothing(corpus, three_parts, tmp_path, damage):
    dirs = copy_parts(three_parts, tmp_path)
    out = tmp_path / "out"
    build_shards(sources(corpus), out, ByteTokenizer(), SEQ, NF, **OPTIONS)  # an older build
    if damage == "flip":  # same size, one token changed: only the sha256 can tell
        path = dirs[2] / TOKENS_BIN
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        match = "tokens.bin: sha256 differs"
    else:
        path = dirs[1] / DOCS_BIN
        path.write_bytes(path.read_bytes()[:-40])
        match = "docs.bin: .* bytes, part.json records"
    before = files_of(out)
    with pytest.raises(PartError, match=match):
        merge_parts(dirs, out, progress=False)
    if damage == "flip":  # found while packing: the older build is gone, nothing new published
        assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
    else:  # found before writing anything: the older build is untouched
        assert files_of(out) == before


def test_cli_parts_and_merge_equal_the_cli_build(capsys, corpus, tmp_path):
    common = ["--bytes", "--seq-len", "16", "--n-future", "2", "--shard-mb", "0.05", "--quiet"]
    srcs = [str(corpus), str(corpus / "docs.jsonl")]
    assert mtp(capsys, "data", "build", *srcs, "--out", str(tmp_path / "one"), *common)[0] == 0
    for i in range(2):
        out = str(tmp_path / f"p{i}")
        assert (
            mtp(capsys, "data", "build", *srcs, "--out", out, *common, "--part", f"{i}/2")[0] == 0
        )
    parts = [str(tmp_path / "p1"), str(tmp_path / "p0")]
    assert mtp(capsys, "data", "merge", *parts, "--out", str(tmp_path / "m"), "--quiet")[0] == 0
    assert files_of(tmp_path / "m") == files_of(tmp_path / "one")
    code, err = mtp(capsys, "data", "build", *srcs, "--out", "x", *common, "--part", "2/2")
    assert code == 2
    one_line(err, "--part 2/2: expected I/N with 0 <= I < N")


# -- the tokenizer's bounded sample ---------------------------------------------------------------


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """240 files of ~40 kB (9.6 MB), each distinct: much larger than any sample taken here."""
    root = tmp_path_factory.mktemp("big")
    text = (STDLIB / "argparse.py").read_text()[:40_000]
    for i in range(240):
        (root / f"d{i % 7}").mkdir(exist_ok=True)
        (root / f"d{i % 7}/f{i:03d}.py").write_text(f"# file {i}\n{text}")
    return root


def test_sample_is_bounded_spread_and_deterministic(big_corpus):
    budget = 1_000_000
    stats = SampleStats()
    texts = list(sample_texts([big_corpus], ["**/*.py"], [], budget, stats=stats))
    assert sum(len(t.encode()) for t in texts) == stats.text_bytes <= stats.unit_bytes <= budget
    assert stats.unit_bytes > budget - 41_000  # filled up to one file short of the budget
    assert stats.units == len(texts) < stats.listed_units == 240
    picked = sorted(int(t.split()[2]) for t in texts)
    assert picked != list(range(len(picked))), "spread over the corpus, not its first files"
    assert max(picked) > 200 and min(picked) < 40
    again = list(sample_texts([big_corpus], ["**/*.py"], [], budget))
    assert again == texts
    other_seed = list(sample_texts([big_corpus], ["**/*.py"], [], budget, seed=1))
    assert sorted(other_seed) != sorted(texts)


def test_sample_streams_one_unit_at_a_time(big_corpus):
    """Reading a 5 MB sample of a 9.6 MB corpus never holds more than a few files' text."""
    # A file is read with one f.read(max_file_bytes + 1) (16 MB by default), and CPython
    # allocates that buffer before it shrinks it to the file: lower the limit to see the rest.
    limits = Limits(max_file_bytes=100_000)
    tracemalloc.start()
    try:
        sample = sample_texts([big_corpus], ["**/*.py"], [], 5_000_000, limits=limits)
        total = sum(len(t) for t in sample)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 4_900_000
    assert peak < 600_000, f"peak {peak} bytes of Python allocations"


def test_sample_reads_jsonl_text_and_skips_what_the_build_skips(corpus):
    stats = SampleStats()
    texts = list(sample_texts([corpus, corpus / "docs.jsonl"], ["**/*.py"], [], 10**9, stats=stats))
    assert "def f():\n    pass\n" in texts and "s = 'é'\n" in texts  # the text field, unescaped
    assert not any(t.startswith('{"text"') for t in texts)
    assert stats.skipped == 3  # empty, binary, bad JSON
    tok = ByteTokenizer()
    m = build_shards([corpus, corpus / "docs.jsonl"], corpus.parent / "b", tok, SEQ, NF,
                     val_fraction=0.0, dedup=False, progress=False)  # fmt: skip
    assert m.totals["documents"] == len(texts)


def test_cli_tokenizer_trains_on_the_sample(capsys, big_corpus, tmp_path):
    args = ["data", "tokenizer", str(big_corpus), "--vocab-size", "400", "--sample-mb", "0.5"]
    code, err = mtp(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 0
    one_line(err, "on a sample of")
    assert mtp(capsys, *args, "--out", str(tmp_path / "b"))[0] == 0
    a, b = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b")
    assert a.identity() == b.identity() and a.vocab_size == 400
    text = (STDLIB / "argparse.py").read_text()[:5000]
    assert a.decode(a.encode(text)) == text
    code, err = mtp(capsys, *args[:-1], "0", "--out", str(tmp_path / "c"))
    assert code == 2
    one_line(err, "--sample-mb 0.0: must be > 0")


def test_max_mb_reads_no_more_of_a_file_than_it_uses(tmp_path):
    """`mtp tokenizer train --max-mb`: a file far larger than the budget is not read whole."""
    big = tmp_path / "big.py"
    line = "x = 'ü' * 3  # a non-ASCII line: the budget counts characters\n"
    big.write_text(line * 100_000)  # 6.5 MB
    tracemalloc.start()
    try:
        lines = list(_iter_lines([big, "tail text"], 10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [line[:-1]] * -(-10_000 // len(line))
    assert peak < 200_000, f"peak {peak} bytes"
