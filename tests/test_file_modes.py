"""Every file and directory the project writes gets the mode the umask gives a new one: under
umask 022 others can read a run, an export or a data set on a shared file system (0644 / 0755),
under 077 nobody else can (0600 / 0700). Nothing is forced open or shut (mtp_dist/files.py).

The sources a command reads (a checkpoint to export or consolidate, a Hugging Face checkpoint to
import) are written under the *other* umask, as a colleague's would be: a copy must not take
its source's mode.
"""

from __future__ import annotations

import os
import stat
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mtp_dist import checkpoint as ckpt
from mtp_dist.cli import main
from mtp_dist.config import ModelConfig, load_config
from mtp_dist.files import copy_tree, current_umask, follow_umask, write_atomic
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer
from mtp_dist.training import Trainer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
RECIPE = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
OTHER = {0o022: 0o077, 0o077: 0o022}


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Paths under `root` (itself included) whose mode is not the one `mask` gives a new file
    (0666) or directory (0777)."""
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)} {mode:o} (want {want:o})")
    return wrong


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted((STDLIB / "json").glob("*.py")):
        (root / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from hf_checkpoints import byte_bpe_tokenizer

    out = tmp_path_factory.mktemp("bpe")
    byte_bpe_tokenizer(out)
    return out


def colleagues_checkpoints(root: Path, hf_tokenizer: Path) -> dict[str, Path]:
    """A single-process checkpoint, the same as a distributed one (model shards), and a Hugging
    Face checkpoint, all small and untrained."""
    from hf_checkpoints import save_model, tokenizer_size

    tok = ByteTokenizer()
    cfg = ModelConfig(
        vocab_size=ckpt.padded_vocab(tok.vocab_size),
        d_model=32,
        n_layers=3,
        n_attn_heads=2,
        n_future=2,
        max_seq_len=64,
    )
    torch.manual_seed(0)
    model = MTPModel(cfg)
    from toy_models import save_checkpoint

    single = save_checkpoint(model, tok, root / "single")
    sharded = save_checkpoint(model, tok, root / "sharded")
    (sharded / "model.pt").unlink()
    shard = ckpt.shard_path(sharded, 0, 0)
    shard.parent.mkdir()
    params = {k: v.float() for k, v in model.state_dict().items()}
    torch.save({"params": params, "sharded": [], "tp_rank": 0, "tp_size": 1}, shard)
    hf = root / "hf"
    save_model(hf, "llama", vocab=tokenizer_size(hf_tokenizer))
    for file in hf_tokenizer.iterdir():
        (hf / file.name).write_bytes(file.read_bytes())
    return {"single": single, "sharded": sharded, "hf": hf}


def train_two_steps(run_dir: Path, corpus: Path) -> None:
    overrides = [
        f"run_dir={run_dir}",
        f"data.source={corpus}",
        "data.tokenizer=bytes",
        "data.seq_len=32",
        "model.d_model=32",
        "model.n_layers=3",
        "model.n_attn_heads=2",
        "model.n_future=2",
        "model.max_seq_len=64",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=1",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.ckpt_every=2",
        "tracking.enabled=false",
    ]
    Trainer(load_config(RECIPE, overrides)).fit()


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_written_files_follow_the_umask(tmp_path, corpus, hf_tokenizer, mask):
    with umask(OTHER[mask]):
        theirs = colleagues_checkpoints(tmp_path / "theirs", hf_tokenizer)
    mine = tmp_path / "mine"
    with umask(mask):
        mine.mkdir()
        train_two_steps(mine / "run", corpus)
        data = ["--bytes", "--seq-len", "16", "--n-future", "2", "--workers", "1", "--quiet"]
        commands = [
            ["export", "hf", str(theirs["single"]), str(mine / "export-hf")],
            ["export", "meta", str(theirs["single"]), str(mine / "export-meta")],
            ["import", "hf", str(theirs["hf"]), "--out", str(mine / "imported")],
            ["checkpoint", "consolidate", str(theirs["sharded"]), "--out", str(mine / "cons")],
            ["data", "build", str(corpus), "--out", str(mine / "data"), *data],
            ["data", "build", str(corpus), "--out", str(mine / "part"), *data, "--part", "0/1"],
        ]
        for argv in commands:
            assert main(argv) == 0, argv
    assert (mine / "export-hf" / "model.safetensors").is_file()
    assert (mine / "export-hf" / "mtp_heads.safetensors").is_file()
    assert (mine / "data" / "manifest.json").is_file()
    assert (mine / "part" / "part.json").is_file()
    assert ckpt.latest_checkpoint(mine / "run") is not None
    wrong = wrong_modes(mine, mask)
    assert not wrong, "\n".join(wrong)


def test_helpers_follow_the_umask_they_find(tmp_path):
    for mask in (0o022, 0o077, 0o027):
        src, out = tmp_path / f"src{mask:o}", tmp_path / f"out{mask:o}"
        with umask(OTHER.get(mask, 0o022)):
            (src / "sub").mkdir(parents=True)
            (src / "sub" / "f").write_text("x")
            (src / "tool").write_text("#!/bin/sh\n")
            (src / "tool").chmod(0o700)
        with umask(mask):
            assert current_umask() == mask
            out.mkdir()
            copy_tree(src / "sub", out / "copy")
            write_atomic(out / "atomic.json", "{}")
            follow_umask(src)
        assert (out / "copy" / "f").read_text() == "x"
        assert (out / "atomic.json").read_text() == "{}"
        assert sorted(p.name for p in out.iterdir()) == ["atomic.json", "copy"]  # no temp left
        assert wrong_modes(out, mask) == []
        # follow_umask keeps a program executable, as a new one made under the umask would be
        assert stat.S_IMODE((src / "tool").stat().st_mode) == 0o777 & ~mask
        (src / "tool").unlink()
        assert wrong_modes(src, mask) == []
