"""Reader: rank/worker splits, equal counts, exact resume, bad shards, pipe:/fsspec URLs."""

from __future__ import annotations

import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch
from timeouts import deadline

from data_pipeline import (
    Manifest,
    ManifestError,
    ShardError,
    TokenWindowLoader,
    build_shards,
)
from mtp_dist.tokenizers import ByteTokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ, NF, BS = 32, 2, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~1.5k windows in ~10 train shards, so ranks and workers cross shard boundaries."""
    src = tmp_path_factory.mktemp("src")
    for path in sorted((STDLIB / "email").glob("*.py")):
        if path.stat().st_size < 12_000:
            shutil.copy(path, src / path.name)
    out = tmp_path_factory.mktemp("shards")
    m = build_shards(
        [src], out, ByteTokenizer(), SEQ, NF, shard_bytes=150_000, val_fraction=0.3, progress=False
    )
    assert len(m.splits["train"].shards) >= 8 and m.splits["val"].samples > 30
    return out / "manifest.json"


def _all_windows(manifest: Path, split: str) -> Counter:
    loader = TokenWindowLoader(manifest, split, 1, 0, 1, shuffle_buffer=0)
    return Counter(_rows(_take(loader, loader.batches_per_epoch())))


def _take(loader: TokenWindowLoader, n: int) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _rows(batches: list[torch.Tensor]) -> list[bytes]:
    return [row.numpy().tobytes() for b in batches for row in b]


def test_batches_shape_dtype(shards: Path):
    loader = TokenWindowLoader(
        shards, "train", BS, 0, 1, seq_len=SEQ, n_future=NF, tokenizer=ByteTokenizer()
    )
    batch = next(iter(loader))
    assert batch.shape == (BS, SEQ + NF) and batch.dtype == torch.int64
    assert int(batch.max()) < ByteTokenizer.vocab_size


def test_two_ranks_two_workers_disjoint_equal_complete(shards: Path):
    m = Manifest.load(shards)
    total = m.splits["train"].samples
    everything = _all_windows(shards, "train")
    assert sum(everything.values()) == total
    per_rank = []
    with deadline(60):
        for rank in range(2):
            loader = TokenWindowLoader(shards, "train", BS, rank, 2, seed=5, num_workers=2)
            nb = loader.batches_per_epoch()
            per_rank.append(_rows(_take(loader, nb)))
            assert loader.epoch == 1 and loader.batches_in_epoch == 0
    assert len(per_rank[0]) == len(per_rank[1]) == nb * BS
    seen = Counter(per_rank[0]) + Counter(per_rank[1])
    assert not seen - everything, "every window delivered exists, none twice"
    # complete up to the documented remainder: N % 2 per rank split, then whole batches x workers
    assert total - seen.total() < 2 + 2 * BS * 2
    assert nb == (total // 2) // BS // 2 * 2


def test_epochs_reshuffle_and_seed_is_deterministic(shards: Path):
    a = TokenWindowLoader(shards, "train", BS, 0, 1, seed=1)
    nb = a.batches_per_epoch()
    two_epochs = _rows(_take(a, 2 * nb))
    e0, e1 = two_epochs[: nb * BS], two_epochs[nb * BS :]
    assert e0 != e1
    # same windows, except the < BS that each epoch drops to keep whole batches
    assert (Counter(e0) - Counter(e1)).total() < BS
    again = _rows(_take(TokenWindowLoader(shards, "train", BS, 0, 1, seed=1), nb))
    other = _rows(_take(TokenWindowLoader(shards, "train", BS, 0, 1, seed=2), nb))
    assert again == e0 and other != e0


def test_shuffle_mixes_within_the_buffer(shards: Path):
    plain = _rows(_take(TokenWindowLoader(shards, "train", BS, 0, 1, shuffle_buffer=0), 40))
    mixed = _rows(_take(TokenWindowLoader(shards, "train", BS, 0, 1, shuffle_buffer=64), 40))
    assert plain != mixed and Counter(plain[:64]) == Counter(mixed[:64])


@pytest.mark.parametrize("stop_at", [7, 29])  # mid-epoch, and in the second epoch
def test_exact_resume_two_ranks_two_workers(shards: Path, stop_at: int):
    with deadline(90):
        for rank in range(2):
            make = lambda r=rank: TokenWindowLoader(
                shards, "train", 32, r, 2, seed=3, num_workers=2, shuffle_buffer=100
            )
            ref = make()
            total = ref.batches_per_epoch() + 12
            assert ref.batches_per_epoch() < 29 < total
            expected = _take(ref, total)
            first = make()
            head = _take(first, stop_at)
            state = first.state_dict()
            resumed = make()
            resumed.load_state_dict(state)
            tail = _take(resumed, total - stop_at)
            assert all(torch.equal(x, y) for x, y in zip(head + tail, expected, strict=True))


def test_worker_count_keeps_the_epoch_content(shards: Path):
    zero = TokenWindowLoader(shards, "train", BS, 1, 2, seed=4, num_workers=0)
    two = TokenWindowLoader(shards, "train", BS, 1, 2, seed=4, num_workers=2)
    n = two.batches_per_epoch()
    assert Counter(_rows(_take(zero, zero.batches_per_epoch()))) >= Counter(_rows(_take(two, n)))


def test_resume_refuses_a_different_layout(shards: Path):
    state = TokenWindowLoader(shards, "train", BS, 0, 2, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        TokenWindowLoader(shards, "train", BS * 2, 0, 2, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        TokenWindowLoader(shards, "train", BS, 0, 2, num_workers=0).load_state_dict(state)
    # the state is rank-independent: rank 1 may load rank 0's
    TokenWindowLoader(shards, "train", BS, 1, 2, num_workers=2).load_state_dict(state)


def test_elastic_resume_keeps_epoch_and_fraction(shards: Path):
    two = TokenWindowLoader(shards, "train", BS, 0, 2)
    state = two.state_dict() | {"epoch": 3, "batches_in_epoch": two.batches_per_epoch() // 2}
    one = TokenWindowLoader(shards, "train", BS, 0, 1)
    with pytest.raises(ValueError, match="dp_size"):
        one.load_state_dict(state)
    one.load_state_dict(state, strict=False)
    assert one.epoch == 3
    assert abs(one.batches_in_epoch - one.batches_per_epoch() // 2) <= 1
    with pytest.raises(ValueError, match="seed"):
        one.load_state_dict(state | {"seed": 99}, strict=False)


def test_val_is_one_complete_pass_with_equal_counts(shards: Path):
    everything = _all_windows(shards, "val")
    nb = TokenWindowLoader(shards, "val", BS, 0, 2).batches_per_epoch()
    runs = [
        list(TokenWindowLoader(shards, "val", BS, 0, 2)),
        list(TokenWindowLoader(shards, "val", BS, 1, 2, num_workers=2)),
    ]
    assert len(runs[0]) == len(runs[1]) == nb
    seen = Counter(_rows(runs[0])) + Counter(_rows(runs[1]))
    assert set(seen) == set(everything), "every val window is seen"
    assert seen.total() - everything.total() < 2, "only the wrap-around pads"
    again = list(TokenWindowLoader(shards, "val", BS, 0, 2))
    assert all(torch.equal(x, y) for x, y in zip(again, runs[0], strict=True))


def _copy(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / "manifest.json"


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_shard_is_a_clear_error(shards: Path, tmp_path: Path, workers: int):
    copy = _copy(shards, tmp_path / "ds")
    victim = Manifest.load(copy).splits["train"].shards[3].name
    (copy.parent / victim).unlink()
    loader = TokenWindowLoader(copy, "train", BS, 0, 1, num_workers=workers)
    with deadline(30), pytest.raises(ShardError, match=victim):
        _take(loader, 2 * loader.batches_per_epoch())


@pytest.mark.parametrize("cut", ["mid_sample", "sample_boundary"])
def test_truncated_shard_is_a_clear_error(shards: Path, tmp_path: Path, cut: str):
    copy = _copy(shards, tmp_path / "ds")
    m = Manifest.load(copy)
    victim = m.splits["train"].shards[2]
    path = copy.parent / victim.name
    keep = 5 * m.sample_bytes + (300 if cut == "mid_sample" else 0)
    path.write_bytes(path.read_bytes()[:keep])
    loader = TokenWindowLoader(copy, "train", BS, 0, 1, num_workers=2)
    with deadline(30), pytest.raises(ShardError, match=victim.name):
        _take(loader, loader.batches_per_epoch())


def test_corrupt_bytes_fail_the_sha256_check(shards: Path, tmp_path: Path):
    copy = _copy(shards, tmp_path / "ds")
    m = Manifest.load(copy)
    victim = m.splits["train"].shards[0]
    data = bytearray((copy.parent / victim.name).read_bytes())
    data[m.sample_bytes * 3 - 100] ^= 0xFF  # a token byte of sample 2; sizes stay valid
    (copy.parent / victim.name).write_bytes(bytes(data))
    loader = TokenWindowLoader(copy, "train", 1, 0, 1)  # batch 1: every shard read in full
    with deadline(30), pytest.raises(ShardError, match=f"{victim.name}.*sha256"):
        _take(loader, loader.batches_per_epoch())


def test_skip_mode_keeps_batch_counts(shards: Path, tmp_path: Path):
    copy = _copy(shards, tmp_path / "ds")
    victim = Manifest.load(copy).splits["train"].shards[1]
    (copy.parent / victim.name).unlink()
    loader = TokenWindowLoader(copy, "train", BS, 0, 1, on_bad_shard="skip", num_workers=2)
    with deadline(30):
        got = _take(loader, loader.batches_per_epoch())
    assert len(got) == loader.batches_per_epoch() and loader.epoch == 1
    assert loader.bad_samples == victim.samples


def test_pipe_and_fsspec_urls(shards: Path):
    local = _take(TokenWindowLoader(shards, "train", BS, 0, 2, seed=9, num_workers=2), 30)
    piped = TokenWindowLoader(
        shards, "train", BS, 0, 2, seed=9, num_workers=2, shard_url_template="pipe:cat {dir}/{name}"
    )
    assert all(torch.equal(x, y) for x, y in zip(_take(piped, 30), local, strict=True))
    fs = fsspec.filesystem("memory")
    for path in shards.parent.iterdir():
        fs.pipe(f"/ds/{path.name}", path.read_bytes())
    remote = TokenWindowLoader(
        "memory://ds/manifest.json", "train", BS, 0, 2, seed=9, num_workers=2
    )
    assert all(torch.equal(x, y) for x, y in zip(_take(remote, 30), local, strict=True))


def test_mismatch_and_layout_errors(shards: Path):
    with pytest.raises(ManifestError, match="tokenizer"):
        TokenWindowLoader(shards, "train", BS, 0, 1, tokenizer={"kind": "sentencepiece"})
    with pytest.raises(ManifestError, match="n_future"):
        TokenWindowLoader(shards, "train", BS, 0, 1, seq_len=SEQ, n_future=NF + 2)
    with pytest.raises(ManifestError, match="too few"):
        TokenWindowLoader(shards, "train", 10_000, 0, 1)
    with pytest.raises(ManifestError, match="no split"):
        TokenWindowLoader(shards, "test", BS, 0, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        TokenWindowLoader(shards, "train", BS, 2, 2)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        TokenWindowLoader(shards.parent / "nope.json", "train", BS, 0, 1)


def test_state_dict_counts_only_consumed_batches(shards: Path):
    loader = TokenWindowLoader(shards, "train", BS, 0, 1, num_workers=2)
    _take(loader, 5)  # workers have prefetched more than 5; the state must not say so
    state = loader.state_dict()
    assert (state["epoch"], state["batches_in_epoch"], state["samples_consumed"]) == (0, 5, 5 * BS)
    names = {s.name for s in Manifest.load(shards).splits["train"].shards}
    assert len(state["next_reads"]) == 2 and {r["shard"] for r in state["next_reads"]} <= names
