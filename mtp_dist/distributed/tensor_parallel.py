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

`load_initial_params` cuts this rank's shards from the single-process initial weights, streamed
one parameter at a time (so every layout starts from exactly the single-process weights without
a full model on any rank); the inverse of the cut, joining the shards along
`split_dim`, is `checkpointing.merge_shards` (offline, for `mtp checkpoint consolidate`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers import IGNORE_INDEX, RMSNorm
from .sequence_parallel import GatheringNorm, reduce_scatter_sequence, saving_slices

# Parameter name suffix -> dimension split over tensor-parallel ranks (None: replicated).
_COLUMN = ("wq.weight", "wk.weight", "wv.weight", "w_gate.weight", "w_up.weight")
_ROW = ("wo.weight", "w_down.weight")
_VOCAB = ("embed.weight", "proj.weight")


def split_dim(name: str) -> int | None:
    """Which dimension of full parameter `name` (MTPModel naming, flat head names included) is
    split over tensor-parallel ranks: 0 for column/vocab layers, 1 for row layers, None if
    replicated (norms)."""
    dotted = name.replace("__", ".")
    if dotted.endswith(_COLUMN) or dotted.endswith(_VOCAB):
        return 0
    if dotted.endswith(_ROW):
        return 1
    return None


def deepcopy_sharing(module: nn.Module, memo: dict, *shared) -> nn.Module:
    """Deep copy that shares `shared` objects (process groups, Megatron configs) instead of
    copying them: MultiTokenHeads deep-copies a head into a parameter-free meta template, and a
    ProcessGroup cannot be copied."""
    memo.update({id(obj): obj for obj in shared if obj is not None})
    clone = type(module).__new__(type(module))
    memo[id(module)] = clone
    clone.__dict__ = copy.deepcopy(module.__dict__, memo)
    return clone


class _TensorOut(nn.Module):
    """Megatron's linear layers return (output, bias); the model wants a tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _bias = self.inner(x)
        return out

    def __deepcopy__(self, memo):
        return deepcopy_sharing(
            self, memo, self.inner.config, getattr(self.inner, "tp_group", None)
        )


class _SequenceGatheredColumn(_TensorOut):
    """Sequence parallelism: the column layer reads the sequence its norm gathered, and keeps
    only this rank's slice of it for backward (`saving_slices`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with saving_slices(x):
            return super().forward(x)


class _SequenceScatteringRow(_TensorOut):
    """Sequence parallelism: the row layer's partial products are reduce-scattered along the
    sequence instead of all-reduced. The parameter is Megatron's RowParallelLinear's; its
    forward is a plain matmul plus our collective (see sequence_parallel.py for why not
    Megatron's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = torch.nn.functional.linear(x, self.inner.weight)
        return reduce_scatter_sequence(partial, self.inner.tp_group)


class _VocabEmbedding(_TensorOut):
    """VocabParallelEmbedding returns a tensor already; the wrapper keeps the same parameter
    names and process-group-sharing deepcopy as the linear layers. With `scatter_sequence`
    the per-rank partial lookups are reduce-scattered along the sequence (Megatron's
    `reduce_scatter_embeddings` path is CUDA-only in 0.16.1), so the trunk starts on
    this rank's slice."""

    def __init__(self, inner: nn.Module, scatter_sequence: bool = False) -> None:
        super().__init__(inner)
        self.scatter_sequence = scatter_sequence

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.scatter_sequence:
            return self.inner(ids)
        emb = self.inner  # the same masked lookup as VocabParallelEmbedding.forward
        outside = (ids < emb.vocab_start_index) | (ids >= emb.vocab_end_index)
        local = torch.where(outside, torch.zeros_like(ids), ids - emb.vocab_start_index)
        partial = torch.nn.functional.embedding(local, emb.weight)
        partial = partial.masked_fill(outside[..., None], 0.0)
        return reduce_scatter_sequence(partial, emb.tp_group)


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
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig

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

    def column(self, in_features: int, out_features: int) -> nn.Module:
        from megatron.core.tensor_parallel import ColumnParallelLinear

        layer = ColumnParallelLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=self._init,
            bias=False,
            gather_output=False,
            # the gathering norm's backward already sums the input gradient over the group
            disable_grad_reduce=self.sequence_parallel,
        )
        return (_SequenceGatheredColumn if self.sequence_parallel else _TensorOut)(layer)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        from megatron.core.tensor_parallel import RowParallelLinear

        layer = RowParallelLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=self._init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        return (_SequenceScatteringRow if self.sequence_parallel else _TensorOut)(layer)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        layer = VocabParallelEmbedding(
            vocab_size,
            dim,
            init_method=self._init,
            config=self.config,
        )
        return _VocabEmbedding(layer, scatter_sequence=self.sequence_parallel)

    def norm(self, dim: int, eps: float) -> nn.Module:
        return GatheringNorm(dim, eps, self.group) if self.sequence_parallel else RMSNorm(dim, eps)

    def unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        # A column split over the vocabulary: each rank yields its (N, V / tp) logits shard.
        return self.column(dim, vocab_size)

    def token_loss(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token CE, per-token correct) from this rank's vocab shard (N, V/tp)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

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


# -- full <-> shard ---------------------------------------------------------------------------
def unwrap_name(local_name: str) -> str:
    """A name under MegatronLayers' wrappers -> the MTPModel name (`inner` removed)."""
    return local_name.replace("__inner__", "__").replace(".inner.", ".")


@torch.no_grad()
def load_initial_params(
    model: nn.Module,
    stream: Iterable[tuple[str, torch.Tensor]],
    tp_rank: int,
    tp_size: int,
    sharded: set[str],
) -> None:
    """Copy this rank's part of each (MTPModel name, full tensor) of `stream` into `model`
    (local names: Megatron wrappers' `inner` removed), one parameter at a time (the stream
    builds one layer at a time), so no rank ever holds the full model. `sharded` names the
    local parameters that are tensor-parallel shards (a head-parallel model keeps its head
    layers whole); parameters this rank does not hold (other stages', other ranks' heads) are
    skipped. Every local parameter must be covered."""
    own = {unwrap_name(n): (n, p) for n, p in model.named_parameters()}
    filled = set()
    for full_name, tensor in stream:
        if full_name not in own:
            continue
        local_name, param = own[full_name]
        dim = split_dim(full_name)
        if dim is not None and tp_size > 1 and local_name in sharded:
            tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
        param.copy_(tensor)
        filled.add(full_name)
    missing = sorted(set(own) - filled)
    if missing:
        raise KeyError(f"no initial value for parameters {missing[:3]}...")
