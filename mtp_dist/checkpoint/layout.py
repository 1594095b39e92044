"""The checkpoint format: written atomically, found by their completion marker, pruned to the
last k. Training writes checkpoints, inference / eval / export read them; all of them go
through this package, which imports nothing of training or distributed.

Layout of one checkpoint directory `<run_dir>/checkpoints/step_00000100/`:
    model.pt, optimizer.pt   the local engine's files: model.pt maps canonical parameter names
                             (mtp_dist/model/params.py) to tensors
    deepspeed/, model_shards/, layout.json
                             a distributed engine's files instead (shards.py)
    trainer.pt               step, data-reader positions, RNG states, bad-step counter
    config.yaml              the resolved RunConfig
    tokenizer/               the tokenizer the model was trained with
    complete.json            written last; a directory without it is never loaded

It is assembled under a temporary name and renamed into place (an atomic rename on POSIX), so a
crash mid-write leaves either the previous checkpoints or a `.tmp-*` directory that is ignored.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..config import RunConfig, to_yaml

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit: one line, naming it."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory to assemble the checkpoint of `step` in."""
    tmp = checkpoints_dir(run_dir) / f".tmp-step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, step: int, keep_last: int, meta: dict) -> Path:
    """Mark `tmp` complete, rename it into place and prune old checkpoints."""
    (tmp / MARKER).write_text(json.dumps({"step": step, **meta}))
    final = tmp.parent / f"step_{step:08d}"
    if final.exists():  # re-saving the same step (e.g. after a restart): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(tmp.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_common(tmp: Path, cfg: RunConfig, tokenizer, trainer_state: dict) -> None:
    """Everything besides the engine's own files."""
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    import torch  # here, not at the top: finding checkpoints needs no torch (tests/netns.py)

    tokenizer.save(tmp / "tokenizer")
    torch.save(trainer_state, tmp / "trainer.pt")


def load_file(path: Path, **kwargs):
    """`torch.load`, but a truncated or corrupt file fails with an error naming it."""
    import torch

    try:
        return torch.load(path, **kwargs)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing from the checkpoint") from err
    except Exception as err:  # a corrupt file must name itself
        # torch's text goes on for sentences of advice; the first one says what failed.
        why = str(err).strip().split(". ")[0] or type(err).__name__
        raise CheckpointError(f"cannot read {path}, truncated or corrupt: {why}") from err


def read_trainer_state(path: Path) -> dict:
    return load_file(path / "trainer.pt", weights_only=False)


def check_tokenizer(cfg: RunConfig, tokenizer, where: Path) -> None:
    """The model's vocabulary must fit the tokenizer it is used with."""
    vocab = cfg.model.vocab_size
    # Ours pad the embedding to a multiple of 64; a pretrained model's embedding has the rows
    # it was trained with, which may be more than its tokenizer has (Qwen2.5: 151936 rows for
    # 151665 tokens), never fewer.
    padded = vocab == padded_vocab(tokenizer.vocab_size) or tokenizer.kind == "hf"
    if tokenizer.vocab_size > vocab or not padded:
        raise CheckpointError(
            f"tokenizer mismatch: checkpoint {where} has a model for vocab_size={vocab}, "
            f"but the tokenizer has vocab_size={tokenizer.vocab_size}"
        )


def padded_vocab(tokenizer_vocab: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's vocabulary rounded up (friendlier GEMMs and TP splits)."""
    return (tokenizer_vocab + multiple - 1) // multiple * multiple


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path}: no complete checkpoint (a run directory holds checkpoints/step_*/{MARKER}, "
            f"a checkpoint directory {MARKER})"
        )
    return latest
