"""The planner's parameter side (`mtp plan`, mtp_dist/plan.py): what the model holds, what of it
trains under `train.freeze`, what one rank of a layout holds, and the bytes of its weights,
gradients and optimizer state.

Both families: the parallel heads (`model.mtp_arch=parallel`) and the chain (`chained`: depth 0
is a head layer, modules 1..n-1 add three norms and an eh_proj of d x 2d to theirs).

The whole-model counts come from the parameter table (`mtp_dist.model.parameter_table`, built on
the meta device), so an explicit `model.head_dim`, q/k/v biases and tied embeddings are counted
as the model builds them. The per-rank counts are formulas over the same shapes (a rank's share
of a tensor-split weight is not in the table); tests/test_plan.py holds them to the table and to
the real model. docs/plan.md explains what is counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import RunConfig, freezes

BYTE_VOCAB = 259  # mtp_dist.tokenizers.byte.ByteTokenizer: 256 bytes + BOS, EOS, PAD


def vocab_size(cfg: RunConfig) -> int:
    """model.vocab_size, or what the tokenizer will give it (0 means 'from the tokenizer')."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    return BYTE_VOCAB if cfg.data.tokenizer == "bytes" else cfg.data.sp_vocab_size


def trunk_trains(cfg: RunConfig) -> bool:
    """Whether anything beneath the heads trains. Both freeze modes freeze the embedding and the
    whole trunk, and then the model runs the trunk without autograd (MTPModel.forward; the
    pipeline's FrozenPrefix): no trunk activations kept, no trunk backward, no recompute."""
    return cfg.train.freeze == "none"


def projection_trains(cfg: RunConfig) -> bool:
    """Whether the unembedding's V x d matrix gets a gradient: not under 'trunk_and_head1', and
    not under 'trunk' when it is the (frozen) embedding's matrix."""
    mode = cfg.train.freeze
    return mode == "none" or (mode == "trunk" and not cfg.model.tie_embeddings)


# ---------------------------------------------------------------- the whole model


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameters of the whole model by part, what trains of them, and what the FLOPs count."""

    embed: int
    trunk_layer: int
    head_layer: int
    unembed: int
    """The shared final norm and, untied, the projection (tied: the norm only; the projection
    is the embedding's matrix, counted once, in `embed`)."""
    total: int
    trainable: int
    """Parameters that train under train.freeze (the rest get no gradient, no optimizer state)."""
    largest_layer: int
    """Largest single module's parameters (the unembedding or embedding, usually): what
    ZeRO-3 gathers whole at once (DeepSpeed's `largest_layer_params`)."""
    largest_trainable: int
    """Largest module that trains: the largest gradient ZeRO-3 makes whole at once."""
    layer_matmul: int
    """Matmul weights of one layer (trunk or head; norms and biases are no matmuls)."""
    unembed_matmul: int
    """The unembedding's V x d, spent by every head whether or not it is tied."""
    module: int = 0
    """Parameters of one chained module (its layer, three norms, eh_proj); 0: none (the
    parallel family, or a chain of n_future 1)."""
    module_matmul: int = 0
    """Matmul weights of one chained module: its layer's and eh_proj's d x 2d."""


def param_counts(cfg: RunConfig) -> ParamCounts:
    from .model import parameter_table  # torch import: only when a plan is made

    m = dataclasses.replace(cfg.model, vocab_size=vocab_size(cfg))
    by: dict[tuple[str, int | None], int] = {}
    train: dict[tuple[str, int | None], int] = {}
    matmul: dict[tuple[str, int | None], int] = {}
    for spec in parameter_table(m).values():
        key, size = (spec.owner.kind, spec.owner.index), math.prod(spec.shape)
        by[key] = by.get(key, 0) + size
        if not freezes(cfg.train.freeze, spec.owner):
            train[key] = train.get(key, 0) + size
        if spec.role != "norm" and not spec.path.endswith(".bias"):
            matmul[key] = matmul.get(key, 0) + size
    trunk = [v for (k, _), v in by.items() if k == "trunk"]
    return ParamCounts(
        embed=by[("embed", None)],
        trunk_layer=trunk[0] if trunk else 0,
        head_layer=by[("head", 0)],
        unembed=by[("unembed", None)],
        total=sum(by.values()),
        trainable=sum(train.values()),
        largest_layer=max(by.values()),
        largest_trainable=max(train.values(), default=0),
        layer_matmul=matmul[("head", 0)],
        unembed_matmul=m.vocab_size * m.d_model,
        module=by.get(("head", 1), 0) if m.chained else 0,
        module_matmul=matmul.get(("head", 1), 0) if m.chained else 0,
    )


# ---------------------------------------------------------------- one rank


def stage_layers(n_trunk: int, pipeline: int) -> list[tuple[bool, int, bool]]:
    """Per stage: (holds the embedding, trunk layers held, holds the heads). The pipeline is
    [embedding, trunk layers..., heads] cut uniformly by layer count, as DeepSpeed's
    `partition_method="uniform"` (`deepspeed.runtime.utils.partition_uniform`) cuts it."""
    items = n_trunk + 2
    if items <= pipeline:
        bounds = [min(p, items) for p in range(pipeline + 1)]
    else:
        chunk, residual = divmod(items, pipeline)
        bounds = [p * chunk + min(p, residual) for p in range(pipeline + 1)]
    out = []
    for s in range(pipeline):
        lo, hi = bounds[s], bounds[s + 1]
        trunk = max(0, min(hi, items - 1) - max(lo, 1))
        out.append((lo == 0 < hi, trunk, hi == items > lo))
    return out


def head_share(cfg: RunConfig, lay) -> tuple[int, int]:
    """(heads held, of which train) on the last stage's worst rank. Head parallelism gives head
    group k the contiguous heads [k n / head, (k+1) n / head) (`Topology.head_ids`); the worst
    rank holds the most heads, and among those the most that train ('trunk_and_head1' freezes
    head 0: its rank has one head fewer to train). A frozen head builds no graph, so the trainable
    heads are also the heads whose loss is differentiated. Under tensor parallelism (tensor > 1)
    every rank holds a 1/t slice of every head, as `rank_param_counts` counts it."""
    n = cfg.model.n_future
    groups = 1 if lay.tensor > 1 else lay.head
    head0_frozen = cfg.train.freeze == "trunk_and_head1"
    shares = []
    for k in range(groups):
        lo, hi = k * n // groups, (k + 1) * n // groups
        shares.append((hi - lo, hi - lo - int(head0_frozen and lo == 0 < hi)))
    return max(shares)


def _split(count_split: int, count_replicated: int, t: int) -> int:
    return count_split // t + count_replicated


def rank_param_counts(cfg: RunConfig, lay, stage: int) -> tuple[int, int]:
    """(parameters, trainable parameters) one rank of pipeline stage `stage` holds (before
    ZeRO-3 sharding): its stage's modules, 1/tensor of every tensor-split weight (norms whole),
    its head group's share of the heads (`head_share`) and the shared final norm + unembedding.

    A layer: q (d x H hd), k and v (d x Hkv hd each), o (H hd x d), the SwiGLU's 3 d f, the q/k/v
    biases when model.attn_bias (split with their columns), and two norms of d. Tied embeddings
    (pipeline 1, head 1: the embedding and the heads on the one stage) have no projection of
    their own: the embedding's matrix is counted once.

    The chained family (head 1 always): depth 0 is a layer, each of the n-1 modules a layer
    plus `chain_module_extra`; on a pipeline the last stage also holds a copy of the embedding
    (its modules embed the tokens ahead; tied to the first stage's, mtp_dist/distributed/
    pipeline.py), which trains with the trunk."""
    m, t, mode = cfg.model, lay.tensor, cfg.train.freeze
    d, f, v = m.d_model, m.ffn_width, vocab_size(cfg)
    q, kv = m.n_attn_heads * m.attn_head_dim, m.kv_heads * m.attn_head_dim
    bias = q + 2 * kv if m.attn_bias else 0
    layer = _split(2 * d * q + 2 * d * kv + 3 * d * f + bias, 2 * d, t)
    embed, trunk, heads = stage_layers(m.trunk_layers, lay.pipeline)[stage]
    below = trunk * layer + (v * d // t if embed else 0)
    held, trainable = below, below if trunk_trains(cfg) else 0
    if heads:
        n_heads, n_train = head_share(cfg, lay)
        shared = d + (0 if m.tie_embeddings else v * d // t)
        # Every freeze mode trains the modules (only depth 0 is 'head 0').
        modules = (m.n_future - 1) * chain_module_extra(cfg) if m.chained else 0
        held += n_heads * layer + shared + modules
        trainable += n_train * layer + (0 if mode == "trunk_and_head1" else shared) + modules
        if m.chained and not embed:
            copy = v * d // t
            held, trainable = held + copy, trainable + (copy if trunk_trains(cfg) else 0)
    return held, trainable


def chain_module_extra(cfg: RunConfig) -> int:
    """Parameters a chained module holds beyond its transformer layer, on every rank: enorm,
    hnorm and norm (d each) and eh_proj (d x 2d), never split by tensor parallelism
    (`LayerFactory.replicated`)."""
    d = cfg.model.d_model
    return 3 * d + 2 * d * d


def rank_params(cfg: RunConfig, lay, stage: int) -> int:
    """Parameters one rank of pipeline stage `stage` holds (`rank_param_counts`)."""
    return rank_param_counts(cfg, lay, stage)[0]


# ---------------------------------------------------------------- model states


def model_state_bytes(
    params: int,
    lay,
    bf16: bool,
    largest: int,
    trainable: int | None = None,
    largest_trainable: int | None = None,
) -> dict[str, int]:
    """Weights, gradients, optimizer state (AdamW) of one rank holding `params` parameters, of
    which `trainable` (default all) train: weights are over every parameter held (frozen ones
    stay in memory in the training dtype), gradients and optimizer state over the trainable ones
    only (frozen ones are left out of the optimizer, and DeepSpeed ZeRO partitions only what its
    optimizer holds).

    One process (LocalEngine): fp32 weights (bf16 is autocast), fp32 gradients, two fp32
    moments: 4 + 4 + 8 bytes per parameter. DeepSpeed (bytes per parameter, N = data):
    stage 0: w, w (+4 fp32 gradients under bf16), 8 (+4 fp32 master under bf16);
    stage 1: w, w + 4/N, 12/N (fp32 master + moments sharded; DeepSpeed keeps an fp32 master
    partition and an fp32 gradient partition even when w is 4);
    stage 2: w, (w + 4)/N, 12/N; stage 3: w/N + the largest module gathered (w x largest),
    4/N + the largest trainable module's gradient made whole (w x largest trainable), 12/N.
    At bf16 (w = 2) with everything training, stages 2 and 3 are DeepSpeed's estimators:
    2P + 18P/N and 18P/N + 4 x largest."""
    tr = params if trainable is None else trainable
    big_tr = largest if largest_trainable is None else largest_trainable
    if lay.local_engine:
        return {"weights": 4 * params, "gradients": 4 * tr, "optimizer": 8 * tr}
    w, n, z = (2 if bf16 else 4), lay.data, lay.zero_stage
    if z == 0:
        extra = 4 * tr if bf16 else 0
        return {"weights": w * params, "gradients": w * tr + extra, "optimizer": 8 * tr + extra}
    opt = 12 * tr // n
    if z == 1:
        return {"weights": w * params, "gradients": w * tr + 4 * tr // n, "optimizer": opt}
    if z == 2:
        return {"weights": w * params, "gradients": (w + 4) * tr // n, "optimizer": opt}
    return {
        "weights": w * params // n + w * largest,
        "gradients": 4 * tr // n + w * big_tr,
        "optimizer": opt,
    }
