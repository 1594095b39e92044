"""`train.freeze`: which parameters do not train, applied to a model before its optimizer exists.

Modes, by the parameter table's owners (mtp_dist/model/params.py):

    none               everything trains
    trunk              embed + trunk k frozen; heads, final norm and unembedding train
    trunk_and_head1    embed + trunk k + head 0 + unembed frozen: only heads 2..n train,
                       the next-token model stays bit-identical (Medusa-1 style)

A tied unembedding is `embed.weight`, so it is frozen with the embedding in both modes.

Freezing is `requires_grad=False`, set before any optimizer, DeepSpeed engine or pipeline
module sees the model: the optimizer groups (`param_groups`) take only trainable parameters, so
a frozen parameter has no optimizer state, no ZeRO partition of master weights or moments, no
gradient buffer and no weight decay, and it stays exactly as loaded. The model runs the trunk
without autograd when nothing beneath the heads trains (MTPModel.forward), and the sequential
head loss builds no graph for a head none of whose tensors train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FROZEN_OWNERS, ModelConfig, freezes
from ..model import parameter_table


def frozen_names(cfg: ModelConfig, mode: str) -> set[str]:
    """Canonical names of the parameters `train.freeze=mode` freezes in a model of `cfg`."""
    if mode not in FROZEN_OWNERS:
        raise ValueError(f"train.freeze={mode!r}: expected one of {', '.join(FROZEN_OWNERS)}")
    return {name for name, spec in parameter_table(cfg).items() if freezes(mode, spec.owner)}


@dataclass(frozen=True)
class FreezeCounts:
    """Elements of this process's parameters that train and that are frozen."""

    trainable: int
    frozen: int


def apply_freeze(model: nn.Module, cfg: ModelConfig, mode: str) -> FreezeCounts:
    """Set requires_grad=False on `model`'s parameters that `mode` freezes. `model` is an
    MTPModel or this rank's part of one: its parameter names are canonical (a head-parallel
    rank holds a subset of the heads, a tensor-parallel rank slices of each tensor)."""
    frozen = frozen_names(cfg, mode)
    names = set(parameter_table(cfg))
    counts = [0, 0]
    for name, param in model.named_parameters():
        if name not in names:  # a name the table does not know would silently train
            raise ValueError(f"parameter {name!r} is not in the model's parameter table")
        if name in frozen:
            param.requires_grad_(False)
        counts[not param.requires_grad] += param.numel()
    return FreezeCounts(trainable=counts[0], frozen=counts[1])


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (the ones an optimizer and gradient clipping see)."""
    return [p for p in model.parameters() if p.requires_grad]


# -- a part of the model that trains nothing, under DeepSpeed ---------------------------------
ANCHORS = {"frozen_anchor_matrix": (1, 1), "frozen_anchor_vector": (1,)}
"""Names and shapes of the placeholder parameters `add_anchor` registers: one for each of the
optimizer's groups (`param_groups`: decayed matrices, undecayed vectors)."""


class _ZeroGradient(torch.autograd.Function):
    """A scalar 0 whose backward hands `x` a zero gradient of its shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.new_zeros(ctx.shape, dtype=ctx.dtype)


def zero_link(y: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
    """y, plus zeros through which a backward from y gives each of `xs` a zero gradient: the
    values of y are unchanged, and nothing is differentiated on the way to them."""
    for x in xs:
        y = y + _ZeroGradient.apply(x).to(y.dtype)
    return y


def add_anchor(module: nn.Module) -> tuple[nn.Parameter, ...]:
    """Register placeholder parameters (zeros, `ANCHORS`) on `module`, for a rank whose part of
    the model trains nothing (a pipeline stage of frozen trunk layers; a head-parallel rank
    holding head 1 alone under 'trunk_and_head1'). DeepSpeed needs them there: its ZeRO
    optimizer reads the first parameter of its first group, it runs collectives per group over
    the model-parallel group (so every rank needs the same groups, each non-empty), and its
    backward call needs a loss that requires grad. The caller links them (`zero_link`) into
    what the rank backpropagates: a zero gradient each step, so AdamW moves them by exactly 0
    (and decays 0 to 0). They have no canonical name: they are in DeepSpeed's own checkpoint,
    not in the model's."""
    param = next(module.parameters(), None)
    dtype = torch.float32 if param is None else param.dtype
    anchors = []
    for name, shape in ANCHORS.items():
        anchors.append(nn.Parameter(torch.zeros(shape, dtype=dtype)))
        module.register_parameter(name, anchors[-1])
    return tuple(anchors)
