"""Tensor parallelism from Megatron-core, applied through the model's `LayerFactory` seam.

`MegatronLayers` makes ColumnParallelLinear(gather_output=False) / RowParallelLinear(
input_is_parallel=True) for attention and MLP (whole attention heads per rank: q, k, v are
separate column layers), VocabParallelEmbedding for the input embedding, and a vocab-parallel
unembedding whose shard of the logits goes straight into `vocab_parallel_cross_entropy`, so no
rank ever holds full logits. The model code is unchanged: it only sees modules that map tensors
to tensors.

Sequence parallelism (`parallel.sequence_parallel`, Korthikanti et al. 2022): between layers the
residual stream and the norms hold only this rank's slice of the sequence (B, T / tp, d). The
embedding and every row layer reduce-scatter along the sequence instead of all-reducing, and each
norm all-gathers its output for the column layers after it: the same communication volume as
plain tensor parallelism, with the norm/residual activations divided by tp.

The layers are subclasses of Megatron's (forward returning a tensor rather than Megatron's
(output, bias) pair), not wrappers around them, so a parameter's name in a tensor-parallel
model is its canonical name (mtp_dist/model/params.py) and nothing has to rewrite it.

`load_initial_params` cuts this rank's shards from the single-process initial weights, streamed
one parameter at a time (so every layout starts from exactly the single-process weights without
a full model on any rank), along each parameter's split dimension from the parameter table; the
inverse, joining the shards, is `mtp_dist.checkpoint.merge_shards` (offline, for `mtp
checkpoint consolidate`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn

from ..model import ParamTable
from ..model.layers import IGNORE_INDEX, RMSNorm
from .sequence_parallel import GatheringNorm, reduce_scatter_sequence, saving_slices
from .shared_copy import deepcopy_sharing


class _SharesGroups:
    """MultiTokenHeads deep-copies a head into a parameter-free meta template; a ProcessGroup
    cannot be copied, so the copy shares the group and Megatron's config."""

    def __deepcopy__(self, memo):
        return deepcopy_sharing(self, memo, getattr(self, "config", None), self.tp_group)


class _Column(_SharesGroups, ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _bias = super().forward(x)
        return out


class _Row(_SharesGroups, RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _bias = super().forward(x)
        return out


class _TiedColumn(_SharesGroups, ColumnParallelLinear):
    """A vocab-parallel projection by a weight handed in (the embedding's shard: tied
    embeddings), as Megatron ties its output layer (`skip_weight_param_allocation`)."""

    def __init__(self, *args, sequence_parallel: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gathered_sequence = sequence_parallel

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.gathered_sequence:
            with saving_slices(x):
                out, _bias = super().forward(x, weight=weight)
            return out
        out, _bias = super().forward(x, weight=weight)
        return out


class _SequenceGatheredColumn(_Column):
    """Sequence parallelism: the column layer reads the sequence its norm gathered, and keeps
    only this rank's slice of it for backward (`saving_slices`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with saving_slices(x):
            return super().forward(x)


class _SequenceScatteringRow(_Row):
    """Sequence parallelism: the row layer's partial products are reduce-scattered along the
    sequence instead of all-reduced. The parameter is Megatron's RowParallelLinear's; its
    forward is a plain matmul plus our collective (see sequence_parallel.py for why not
    Megatron's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = torch.nn.functional.linear(x, self.weight)
        return reduce_scatter_sequence(partial, self.tp_group)


class _VocabEmbedding(_SharesGroups, VocabParallelEmbedding):
    """With `scatter_sequence` the per-rank partial lookups are reduce-scattered along the
    sequence (Megatron's `reduce_scatter_embeddings` path is CUDA-only in 0.16.1), so the trunk
    starts on this rank's slice."""

    def __init__(self, *args, scatter_sequence: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scatter_sequence = scatter_sequence

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.scatter_sequence:
            return super().forward(ids)
        # the same masked lookup as VocabParallelEmbedding.forward, then our collective
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start_index)
        partial = torch.nn.functional.embedding(local, self.weight)
        partial = partial.masked_fill(outside[..., None], 0.0)
        return reduce_scatter_sequence(partial, self.tp_group)


class MegatronLayers:
    """LayerFactory of Megatron-core tensor-parallel layers over the tensor-parallel group.

    `dtype` is the parameter dtype (float32/float64 on CPU, float32 master weights under bf16
    autocast on GPU); `use_cpu_initialization` keeps construction free of CUDA so the same code
    builds on a CPU/gloo job and on a GPU/NCCL one (the engine moves the model afterwards).
    """

    def __init__(
        self,
        init_std: float = 0.02,
        dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
    ) -> None:
        self.init_std = init_std
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.sequence_parallel = sequence_parallel
        common = dict(
            tensor_model_parallel_size=self.world,
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            params_dtype=dtype,
            # load_initial_params overwrites every weight, but Megatron's CPU init also sets
            # the tensor-parallel attributes (partition_dim, tensor_model_parallel) that
            # clipping and sharding rely on; without it they are missing. Cost: one full
            # weight at a time, built and sliced.
            perform_initialization=True,
        )
        # Megatron's own sequence-parallel paths stay off (CUDA-only in 0.16.1); under
        # `sequence_parallel` the wrappers below and the gathering norms do it instead.
        self.config = ModelParallelConfig(**common)

    def _init(self, weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=self.init_std)

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        layer = (_SequenceGatheredColumn if self.sequence_parallel else _Column)(
            in_features,
            out_features,
            config=self.config,
            init_method=self._init,
            bias=bias,
            gather_output=False,
            # the gathering norm's backward already sums the input gradient over the group
            disable_grad_reduce=self.sequence_parallel,
        )
        return layer

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return (_SequenceScatteringRow if self.sequence_parallel else _Row)(
            in_features,
            out_features,
            config=self.config,
            init_method=self._init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def replicated(self, in_features: int, out_features: int) -> nn.Module:
        # Whole on every rank, like the norms. Without sequence parallelism its input and
        # output gradient are complete on each rank, so its weight gradient is identical
        # everywhere with no collective; with it, the layer sees this rank's positions only
        # and its gradient is summed over the group, as a norm's (`sequence_parallel` marker).
        linear = nn.Linear(in_features, out_features, bias=False, dtype=self.config.params_dtype)
        self._init(linear.weight)
        if self.sequence_parallel:
            linear.weight.sequence_parallel = True
        return linear

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return _VocabEmbedding(
            vocab_size,
            dim,
            init_method=self._init,
            config=self.config,
            scatter_sequence=self.sequence_parallel,
        )

    def norm(self, dim: int, eps: float) -> nn.Module:
        return GatheringNorm(dim, eps, self.group) if self.sequence_parallel else RMSNorm(dim, eps)

    def unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        # A column split over the vocabulary: each rank yields its (N, V / tp) logits shard.
        return self.column(dim, vocab_size)

    def tied_unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        # The embedding's vocab shard (V / tp, d) is exactly the column shard this needs.
        return _TiedColumn(
            dim,
            vocab_size,
            config=self.config,
            init_method=self._init,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=True,
            disable_grad_reduce=self.sequence_parallel,
            sequence_parallel=self.sequence_parallel,
        )

    def token_loss(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token CE, per-token correct) from this rank's vocab shard (N, V/tp)."""
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        # Megatron wants (seq, batch, V/tp); a flat (N, 1, V/tp) view is the same computation.
        loss = vocab_parallel_cross_entropy(logits[:, None, :], safe[:, None])[:, 0]
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        return loss, (vocab_parallel_argmax(logits.detach(), self.group) == labels) & valid


def vocab_parallel_argmax(shard: torch.Tensor, group) -> torch.Tensor:
    """Global argmax over the vocabulary from (N, V/tp) shards; ties go to the lowest id, as in
    torch.argmax on the full logits."""
    world = dist.get_world_size(group)
    values, index = shard.max(dim=-1)  # (N,)
    index = index + dist.get_rank(group) * shard.shape[-1]
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_index = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_index, index.contiguous(), group=group)
    winner = torch.stack(all_values).argmax(dim=0)  # first rank holding the maximum
    return torch.stack(all_index).gather(0, winner[None])[0]


# -- full -> shard ----------------------------------------------------------------------------
@torch.no_grad()
def load_initial_params(
    model: nn.Module,
    stream: Iterable[tuple[str, torch.Tensor]],
    table: ParamTable,
    tp_rank: int,
    tp_size: int,
) -> None:
    """Copy this rank's part of each (canonical name, full tensor) of `stream` into `model`, one
    parameter at a time (the stream builds one layer at a time), so no rank ever holds the full
    model. A local parameter whose shape is smaller than its full shape (`table`) is this rank's
    tensor-parallel slice along the table's split dimension; parameters this rank does not hold
    (other stages', other ranks' heads) are skipped. Every local parameter must be covered."""
    own = dict(model.named_parameters())
    filled = set()
    for name, tensor in stream:
        param = own.get(name)
        if param is None:
            continue
        if tuple(param.shape) != tuple(tensor.shape):
            dim = table[name].split_dim
            if dim is None or tensor.shape[dim] != param.shape[dim] * tp_size:
                raise ValueError(
                    f"{name}: local shape {tuple(param.shape)} is not a 1/{tp_size} slice of "
                    f"{tuple(tensor.shape)}"
                )
            tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
        param.copy_(tensor)
        filled.add(name)
    missing = sorted(set(own) - filled)
    if missing:
        raise KeyError(f"no initial value for parameters {missing[:3]}...")
