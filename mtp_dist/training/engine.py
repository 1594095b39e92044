"""Training engines: what owns the optimizer step.

`TrainEngine` is the seam between the trainer loop and whoever updates the weights. `LocalEngine`
is the single-process one (AdamW, warmup + cosine, clipping, accumulation, autocast); the
distributed layer provides a DeepSpeed-backed engine with the same methods. Each micro-batch gets
exactly one forward and one backward call (what DeepSpeed engines require). Both engines apply
`train.freeze` (`apply_freeze`, before the optimizer exists) and `train.recompute`
(`apply_recompute`) to the model they are given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..checkpoint import load_file
from ..config import TrainConfig
from ..model import MTPModel, split_window
from .freeze import apply_freeze, trainable_parameters


@dataclass
class StepMetrics:
    """Metrics of one optimizer step (or one evaluation), averaged over its micro-batches."""

    loss: float
    head_losses: list[float]
    head_accuracy: list[float]
    tokens: int
    grad_norm: float = float("nan")
    lr: float = 0.0
    skipped: bool = False
    extra: dict = field(default_factory=dict)


class TrainEngine(Protocol):
    model: nn.Module

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepMetrics: ...

    def eval_step(self, batch: torch.Tensor) -> StepMetrics: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps (a multiplier on lr)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; not norms (1-D parameters). Frozen parameters
    (requires_grad=False, `train.freeze`) are in no group: no optimizer state, no decay."""
    trainable = trainable_parameters(model)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


# -- the precision rule and the metrics reduction, shared by every engine --------------------
def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 (autocast, or DeepSpeed's bf16 mode) for 'bf16', and for 'auto' on a GPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def param_dtype(precision: str) -> torch.dtype:
    """Parameter (master weight) dtype: float64 for 'fp64' (tests), float32 otherwise."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast where `uses_bf16`; full precision otherwise."""
    if uses_bf16(precision, device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@dataclass
class HeadTotals:
    """Per-head sums over a step's micro-batches: mean loss, correct and counted tokens, for
    the heads `head_ids` (float64 tensors of shape (len(head_ids),))."""

    head_ids: tuple[int, ...]
    head_losses: torch.Tensor
    head_correct: torch.Tensor
    head_counts: torch.Tensor
    head_weights: tuple[float, ...] | None = None
    """Each head's weight in the loss (the chained family's lambda); None: all 1."""

    @classmethod
    def of(cls, outputs) -> HeadTotals:
        """From the LossOutputs of a step's micro-batches (each loss a per-micro-batch mean)."""
        k = len(outputs)
        return cls(
            tuple(outputs[0].head_ids),
            sum(o.head_losses.double() for o in outputs) / k,
            sum(o.head_correct.double() for o in outputs),
            sum(o.head_counts.double() for o in outputs),
            outputs[0].head_weights,
        )

    def metrics(self, tokens: int) -> StepMetrics:
        losses = self.head_losses
        weights = torch.ones_like(losses) if self.head_weights is None else self.head_weights
        return StepMetrics(
            loss=float((losses * torch.as_tensor(weights, dtype=losses.dtype)).sum()),
            head_losses=losses.tolist(),
            head_accuracy=(self.head_correct / self.head_counts.clamp(min=1)).tolist(),
            tokens=tokens,
        )


def summarize(outputs, tokens: int) -> StepMetrics:
    """Average LossOutputs of several micro-batches into StepMetrics."""
    return HeadTotals.of(outputs).metrics(tokens)


# -- activation recompute, applied by both engines to the model they train -------------------
def recompute_targets(model: MTPModel, mode: str) -> list[nn.Module]:
    """The modules `train.recompute` recomputes: none; each trunk layer's MLP ('selective'); each
    trunk layer ('full'). The heads never: the sequential loss runs each head's forward and
    backward back to back, so its activations are freed as soon as they are used anyway.
    Nor a chain's depths (depth 0 and the modules, model/chain.py): their block activations do
    stay until the chain's reverse sweep, n layers' worth, but they run as functional calls on
    parameter-free templates inside the sequential Function, and the knob is defined on the
    trunk (config's train.recompute, the planner's memory model); docs/distributed.md."""
    if mode == "none":
        return []
    if mode == "selective":
        return [block.mlp for block in model.trunk]
    if mode == "full":
        return list(model.trunk)
    raise ValueError(f"train.recompute={mode!r}: expected none, selective or full")


def apply_recompute(model: MTPModel, mode: str) -> int:
    """Make each of `recompute_targets` keep only its inputs for backward and run its forward
    again when backward reaches it (non-reentrant activation checkpointing). Applied from
    outside, by forward hooks (torch's composable `checkpoint`), so the model's code, its
    parameters and their names are unchanged, and whatever the layers are (local, Megatron's
    tensor-parallel ones, a pipeline stage's) their own forward is what is re-run, collectives
    included, in the same order on every rank. Returns how many modules recompute."""
    from torch.distributed._composable import checkpoint

    targets = recompute_targets(model, mode)
    for module in targets:
        checkpoint(module)
    return len(targets)


class LocalEngine:
    """One process, one device: AdamW + warmup/cosine + clipping + gradient accumulation."""

    def __init__(self, model: MTPModel, cfg: TrainConfig, seq_len: int) -> None:
        self.cfg = cfg
        self.seq_len = seq_len
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device, param_dtype(cfg.precision))
        self.freeze = apply_freeze(self.model, model.cfg, cfg.freeze)  # before the optimizer
        self.recomputed = apply_recompute(self.model, cfg.recompute)  # modules re-run
        self.autocast = autocast_for(cfg.precision, self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            foreach=False,  # deterministic, same order as the distributed engines
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

    def _forward(self, window: torch.Tensor):
        inputs, labels = split_window(window.to(self.device), self.seq_len)
        with self.autocast():
            return self.model(inputs, labels), inputs.numel()

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepMetrics:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outputs, tokens = [], 0
        for window in micro_batches:
            out, n = self._forward(window)
            outputs.append(out)
            tokens += n
            if not torch.isfinite(out.loss):
                return self._skip(outputs, tokens, "non-finite loss")
            (out.loss / len(micro_batches)).backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        # Over the trainable parameters only: a frozen one has no gradient and no say in it.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), clip)
        if not torch.isfinite(grad_norm):
            return self._skip(outputs, tokens, "non-finite gradient")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        metrics = summarize(outputs, tokens)
        metrics.grad_norm, metrics.lr = float(grad_norm), lr
        return metrics

    def _skip(self, outputs, tokens: int, why: str) -> StepMetrics:
        self.optimizer.zero_grad(set_to_none=True)
        metrics = summarize(outputs, tokens)
        metrics.skipped, metrics.extra = True, {"why": why}
        return metrics

    @torch.no_grad()
    def eval_step(self, batch: torch.Tensor) -> StepMetrics:
        self.model.eval()
        out, tokens = self._forward(batch)
        return summarize([out], tokens)

    def save(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), directory / "model.pt")
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.model.load_state_dict(load_file(directory / "model.pt", map_location=self.device))
        state = load_file(directory / "optimizer.pt", map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
