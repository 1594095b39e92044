"""Single-process reference for the equivalence tests (LocalEngine, the same batches)."""

from __future__ import annotations

import torch

from mtp_dist.config import load_config
from mtp_dist.model import MTPModel
from mtp_dist.training.engine import LocalEngine

MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 6, "n_attn_heads": 4, "n_future": 4,
         "ffn_hidden": 64, "max_seq_len": 16}  # fmt: skip
DATA = {"seq_len": 8}
TRAIN = {"micro_batch_size": 2, "grad_accum_steps": 2, "lr": 0.01, "warmup_steps": 1,
         "max_steps": 10, "grad_clip": 0.05, "precision": "fp32", "device": "cpu"}  # fmt: skip


def make_batches(n: int, rows: int, seed: int = 1) -> torch.Tensor:
    """n global micro-batches of `rows` windows of seq_len + n_future tokens."""
    g = torch.Generator().manual_seed(seed)
    width = DATA["seq_len"] + MODEL["n_future"]
    return torch.randint(0, MODEL["vocab_size"], (n, rows, width), generator=g)


def reference(
    batches: torch.Tensor,
    steps: int,
    train: dict | None = None,
    params_at: int | None = None,
    model: dict | None = None,
) -> dict:
    """Per-step head losses and grad norms, first-step gradients (before clipping) of the
    parameters that train, parameters at the start and after `params_at` steps (default: all
    `steps`); `model`: changes to MODEL, `train`: to TRAIN (e.g. train.freeze)."""
    train = {**TRAIN, **(train or {})}
    over = ["run_dir=/tmp/unused"] + [
        f"model.{k}={v}" for k, v in {**MODEL, **(model or {})}.items()
    ]
    over += [f"data.{k}={v}" for k, v in DATA.items()] + [
        f"train.{k}={v}" for k, v in train.items()
    ]
    cfg = load_config(None, over)
    torch.manual_seed(cfg.train.seed)
    engine = LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)
    initial = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    grads: dict = {}
    clip = torch.nn.utils.clip_grad_norm_

    def probe(params, max_norm, *a, **k):
        if not grads:
            named = engine.model.named_parameters()
            grads.update({n: p.grad.detach().clone() for n, p in named if p.requires_grad})
        return clip(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = probe
    try:
        gas = cfg.train.grad_accum_steps
        metrics, params = [], {}
        for s in range(steps):
            metrics.append(engine.train_step([batches[s * gas + k] for k in range(gas)]))
            if s + 1 == (params_at or steps):
                params = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    frozen = {n for n, p in engine.model.named_parameters() if not p.requires_grad}
    return {"losses": [m.head_losses for m in metrics], "norms": [m.grad_norm for m in metrics],
            "grads": grads, "params": params, "initial": initial, "frozen": frozen}  # fmt: skip
