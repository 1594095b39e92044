"""Tensor parallelism from Megatron-core, applied through the model's `LayerFactory` seam.

`MegatronLayers` makes ColumnParallelLinear(gather_output=False) / RowParallelLinear(
input_is_parallel=True) for attention and MLP (whole attention heads per rank: q, k, v are
separate column layers), VocabParallelEmbedding for the input embedding, and a vocab-parallel
unembedding whose shard of the logits goes straight into `vocab_parallel_cross_entropy`, so no
rank ever holds full logits. The model code is unchanged: it only sees modules that map tensors
to tensors.

`shard_from_full` cuts this rank's shards from a single-process `MTPModel` state dict (so every
layout starts from exactly the single-process weights); its inverse, joining the shards along
`split_dim`, is `checkpointing.merge_shards` (offline, for `mtp checkpoint consolidate`).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers import IGNORE_INDEX

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
        # MultiTokenHeads deep-copies a head into a parameter-free meta template; the process
        # group and config must be shared, not copied (a ProcessGroup cannot be copied).
        shared = {id(self.inner.config): self.inner.config}
        if getattr(self.inner, "tp_group", None) is not None:
            shared[id(self.inner.tp_group)] = self.inner.tp_group
        memo.update(shared)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone


class _VocabEmbedding(_TensorOut):
    """VocabParallelEmbedding returns a tensor already; the wrapper keeps the same parameter
    names and process-group-sharing deepcopy as the linear layers."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


class MegatronLayers:
    """LayerFactory of Megatron-core tensor-parallel layers over the tensor-parallel group.

    `dtype` is the parameter dtype (float32/float64 on CPU, float32 master weights under bf16
    autocast on GPU); `use_cpu_initialization` keeps construction free of CUDA so the same code
    builds on a CPU/gloo job and on a GPU/NCCL one (the engine moves the model afterwards).
    """

    def __init__(self, init_std: float = 0.02, dtype: torch.dtype = torch.float32) -> None:
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.init_std = init_std
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.world,
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            params_dtype=dtype,
            perform_initialization=True,
        )

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
        )
        return _TensorOut(layer)

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
        return _TensorOut(layer)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        layer = VocabParallelEmbedding(vocab_size, dim, init_method=self._init, config=self.config)
        return _VocabEmbedding(layer)

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


def shard_from_full(
    full: dict[str, torch.Tensor],
    local_names: list[str],
    tp_rank: int,
    tp_size: int,
    sharded: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's state dict (keys `local_names`) cut from a single-process state dict.

    `sharded` names the local parameters that are tensor-parallel (default: all splittable by
    name); a head-parallel model keeps its head layers whole and passes the smaller set."""
    out = {}
    for name in local_names:
        tensor = full[unwrap_name(name)]
        dim = split_dim(unwrap_name(name))
        if dim is not None and tp_size > 1 and (sharded is None or name in sharded):
            tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
        out[name] = tensor.clone()
    return out


@torch.no_grad()
def load_params(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's parameters by name (Megatron layers add `_extra_state`
    entries to state dicts, so parameters, not state dicts, are the exchange format)."""
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(params))
    if missing:
        raise KeyError(f"no value for parameters {missing[:3]}...")
    for name, tensor in params.items():
        own[name].copy_(tensor)
