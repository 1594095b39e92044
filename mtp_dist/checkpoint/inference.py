"""Loading a checkpoint's model and tokenizer for decoding and evaluation (no training code)."""

from __future__ import annotations

from pathlib import Path

from .layout import check_tokenizer
from .weights import read_weights


def load_for_inference(path: str | Path, tokenizer_dir: str | Path | None = None, device="cpu"):
    """(model in eval mode, tokenizer) from a single-process or consolidated checkpoint (a
    checkpoint directory, or a run directory: its latest complete checkpoint). The weights are
    read memory-mapped and checked against the parameter table (weights.py); `tokenizer_dir`
    replaces the checkpoint's own tokenizer (it must fit the model's vocabulary)."""
    from ..model import MTPModel
    from ..tokenizers import load_tokenizer

    weights = read_weights(path)
    tokenizer = weights.tokenizer
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        check_tokenizer(weights.cfg, tokenizer, weights.path)
    model = MTPModel(weights.cfg.model)
    model.load_state_dict(weights.state)
    return model.to(device).eval(), tokenizer
