"""A single-process checkpoint's weights, checked against its config, for the format adapters
(hf.py, meta.py) and for `mtp train --init-from`.

The state dict is memory-mapped (`torch.load(mmap=True)`): a 7B model is read tensor by tensor
from the page cache instead of being copied into memory first.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, load_config
from ..files import follow_umask
from .layout import CheckpointError, check_tokenizer, load_file, resolve_checkpoint

MODEL_FILE = "model.pt"


@dataclass
class CheckpointWeights:
    """A resolved checkpoint directory, its run config, tokenizer and (mmapped) state dict."""

    path: Path
    cfg: RunConfig
    tokenizer: object
    state: dict[str, torch.Tensor]

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, full tensor) in the model's construction order: what the engines'
        initial-weight loaders consume (mtp_dist/model/init.py streams the random init)."""
        from ..model import parameter_table

        for name in parameter_table(self.cfg.model):
            yield name, self.state[name]


def check_state(state: dict[str, torch.Tensor], cfg: RunConfig, what: str) -> None:
    """Names and shapes of `state` are exactly the model's (CheckpointError otherwise)."""
    from ..model import parameter_table

    table = parameter_table(cfg.model)
    try:
        table.check_names(state, what)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    for name, tensor in state.items():
        if tuple(tensor.shape) != table[name].shape:
            raise CheckpointError(
                f"{what}: {name} has shape {tuple(tensor.shape)}, the model wants "
                f"{table[name].shape}"
            )


def read_weights(path: str | Path) -> CheckpointWeights:
    """The weights of a single-process or consolidated checkpoint (a checkpoint directory or a
    run directory: its latest complete checkpoint); a sharded one is refused with the command
    that makes it single-process."""
    from ..tokenizers import load_tokenizer

    ckpt = resolve_checkpoint(path)
    if not (ckpt / MODEL_FILE).is_file():
        raise CheckpointError(
            f"{ckpt} holds a sharded checkpoint (no {MODEL_FILE}); run "
            f"`mtp checkpoint consolidate {ckpt} --out DIR` and use DIR"
        )
    cfg = load_config(ckpt / "config.yaml")
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    check_tokenizer(cfg, tokenizer, ckpt)
    state = load_file(ckpt / MODEL_FILE, map_location="cpu", mmap=True, weights_only=True)
    check_state(state, cfg, str(ckpt / MODEL_FILE))
    return CheckpointWeights(ckpt, cfg, tokenizer, state)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed to `out` when the block ends without
    an error (removed when it fails): a reader never finds half an export. `out` must not exist
    or be empty, so an export never mixes with older files. Every file and directory in it ends
    with the mode the umask gives (mtp_dist/files.py)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new directory")
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Not every writer in the block follows the umask (safetensors' save_file makes 0600 files,
    # a copy keeps its source's mode): the published export is readable as any new file is.
    follow_umask(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
