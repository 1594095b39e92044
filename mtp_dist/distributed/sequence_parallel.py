"""Sequence parallelism (Korthikanti et al. 2022) for the tensor-parallel trunk and heads.

Between layers the residual stream and the norms hold only this rank's slice of the sequence,
(B, T / tp, d). Each norm all-gathers its output along the sequence for the column layers that
read it (once for q, k and v; once for gate and up); each row layer and the embedding
reduce-scatter along the sequence where plain tensor parallelism all-reduces. Same communication
volume as plain tensor parallelism; the norm/residual activations and their gradients shrink by
tp.

The collectives are ours, not Megatron-core's `gather_from_sequence_parallel_region` /
`reduce_scatter_to_sequence_parallel_region`: in megatron-core 0.16.1 those allocate their output
with `device=torch.cuda.current_device()`, so they cannot run on a CPU/gloo job, and the project
keeps ONE code path that the CPU tests exercise and the GPU runs. They use
`all_gather_into_tensor` / `reduce_scatter_tensor` (NCCL, and gloo in torch >= 2.13) on the
input's device, along dimension 1 of the model's batch-first tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers import RMSNorm
from .shared_copy import deepcopy_sharing


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, t, ...) on each rank -> (B, t * world, ...) in rank order."""
    world = dist.get_world_size(group)
    local = x.transpose(0, 1).contiguous()  # the collective concatenates along dim 0
    out = torch.empty((local.shape[0] * world, *local.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, local, group=group)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, ...) partial sums on each rank -> this rank's (B, T / world, ...) of the sum."""
    world = dist.get_world_size(group)
    if x.shape[1] % world:
        raise ValueError(f"sequence length {x.shape[1]} not divisible by tensor-parallel {world}")
    full = x.transpose(0, 1).contiguous()
    out = torch.empty((full.shape[0] // world, *full.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, full, group=group)
    # contiguous: the result becomes the residual stream, which a pipeline stage sends as is
    return out.transpose(0, 1).contiguous()


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: reduce-scatter (the layers after the gather
    each produce a partial input gradient; the sum over ranks is what the column layers' own
    all-reduce would otherwise compute)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: sum partial outputs over ranks, keep this rank's slice of the sequence.
    Backward: all-gather the slice gradients (every rank's partial output fed every slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_seq(grad, ctx.group), None


class Regather:
    """A gathered activation kept for backward as this rank's slice only, and gathered again
    when backward first needs it (Megatron-LM's column layers do the same under sequence
    parallelism). Shared by every layer that saved the same gathered tensor (q, k and v; gate
    and up): one re-gather, held until the last of them has used it."""

    def __init__(self, shard: torch.Tensor, group) -> None:
        self.shard, self.group = shard, group
        self.pending = 0  # saves not yet unpacked
        self._full: torch.Tensor | None = None

    def packed(self) -> Regather:
        self.pending += 1
        return self

    def unpack(self) -> torch.Tensor:
        full = self._full if self._full is not None else _all_gather_seq(self.shard, self.group)
        self.pending -= 1
        self._full = full if self.pending > 0 else None
        return full


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the sequence; the result carries a `Regather` of x for the layers that
    read it (see `saving_slices`)."""
    full = _GatherSequence.apply(x, group)
    full.sp_regather = Regather(x.detach(), group)
    return full


@contextlib.contextmanager
def saving_slices(x: torch.Tensor):
    """While a layer runs on the gathered tensor x: whatever it saves for backward that is x
    (or a view of x) is saved as the slice and re-gathered in backward. Anything else it saves
    (its weight; under autocast a cast copy of x) is saved as usual."""
    regather: Regather | None = getattr(x, "sp_regather", None)
    if regather is None:
        yield
        return
    storage = x.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() != storage:
            return t
        return regather.packed(), t.shape, t.stride(), t.storage_offset()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        source, shape, stride, offset = packed
        return source.unpack().as_strided(shape, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSequence.apply(x, group)


class SequenceShards:
    """What the chained family's model needs to know of the sequence split (MTPModel's
    `sequence_gather` and `sequence_positions`): this rank holds positions
    [rank * T / tp, (rank + 1) * T / tp) of the residual stream, in rank order."""

    def __init__(self, group) -> None:
        self.group = group

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A module's normed output (B, t, d) -> the whole sequence, for the projection."""
        return gather_sequence(x, self.group)

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The sequence's positions (T,) -> this rank's (T / tp,)."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        return positions.chunk(world)[rank]


class GatheringNorm(RMSNorm):
    """RMSNorm on this rank's slice of the sequence, then one all-gather for the column layers
    that read it. Its weight sees only this rank's tokens, so its gradient is summed over the
    tensor-parallel group (`reduce_sequence_parallel_grads`)."""

    def __init__(self, dim: int, eps: float, group) -> None:
        super().__init__(dim, eps)
        self.group = group
        self.weight.sequence_parallel = True  # the marker Megatron-core uses for the same sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_sequence(super().forward(x), self.group)

    def __deepcopy__(self, memo):
        return deepcopy_sharing(self, memo, self.group)


def reduce_sequence_parallel_grads(model: nn.Module, group) -> int:
    """Sum the gradients of sequence-parallel norm weights over the tensor-parallel group as
    they are produced: a hook on the parameter, so it runs inside the one backward call, before
    DeepSpeed's gradient hooks see the gradient. Every rank of the group runs the same graph, so
    the hooks' collectives line up. A frozen norm (`train.freeze`) has no gradient and gets no
    hook (torch refuses a hook on a tensor that requires none). Returns how many were hooked."""

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            param.register_hook(all_reduce)
            hooked += 1
    return hooked
