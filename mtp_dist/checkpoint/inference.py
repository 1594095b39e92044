"""Loading a checkpoint's model and tokenizer for decoding and evaluation (no training code)."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from .layout import CheckpointError, check_tokenizer, load_file, resolve_checkpoint


def load_for_inference(path: str | Path, tokenizer_dir: str | Path | None = None, device="cpu"):
    """(model in eval mode, tokenizer) from a single-process or consolidated checkpoint (a
    checkpoint directory, or a run directory: its latest complete checkpoint)."""
    from ..model import MTPModel, parameter_table
    from ..tokenizers import load_tokenizer

    ckpt = resolve_checkpoint(path)
    if not (ckpt / "model.pt").is_file():
        raise CheckpointError(
            f"{ckpt} holds a sharded checkpoint; run `mtp checkpoint consolidate` first"
        )
    cfg = load_config(ckpt / "config.yaml")
    tokenizer = load_tokenizer(tokenizer_dir or ckpt / "tokenizer")
    check_tokenizer(cfg, tokenizer, ckpt)
    state = load_file(ckpt / "model.pt", map_location="cpu")
    table = parameter_table(cfg.model)
    try:
        table.check_names(state, f"{ckpt / 'model.pt'}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != table[name].shape:
                raise ValueError(
                    f"{ckpt / 'model.pt'}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"in config.yaml wants {table[name].shape}"
                )
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    model = MTPModel(cfg.model)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer
