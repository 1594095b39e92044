"""The memory and time planner behind `mtp plan`: pure functions over a RunConfig and a layout.

Per rank: bytes of weights, gradients and optimizer state (by engine, ZeRO stage and precision),
of activations (per trunk layer, by tensor / sequence parallelism, pipeline schedule and
recompute) and of the heads' loss (sequential, naive or chunked; the parallel heads or the
chain of `model.mtp_arch=chained`); then the FLOPs per token (the n heads or depths and the
unembedding counted n times), the step time at a given MFU, tokens per day
and days to a token budget. No process group, no model weights: the parameter shapes come from
the parameter table (`mtp_dist.model.parameter_table`, built on the meta device); what a
rank holds and what of it trains under `train.freeze`: mtp_dist/plan_params.py.

The formulas, what they count and where they agree with Megatron-LM's
`theoretical_memory_usage.py` and DeepSpeed's `estimate_zero*_model_states_mem_needs`:
docs/plan.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import ConfigError, RunConfig
from .plan_params import BYTE_VOCAB as BYTE_VOCAB
from .plan_params import ParamCounts as ParamCounts
from .plan_params import (
    head_share,
    model_state_bytes,
    param_counts,
    projection_trains,
    rank_param_counts,
    stage_layers,
    trunk_trains,
    vocab_size,
)
from .plan_params import rank_params as rank_params

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where a run's ranks go: tensor × pipeline × data (× head, on the model axis when
    tensor == 1), the ZeRO stage and the recompute mode."""

    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline stages."""
    head: int = 1
    """Head-parallel size (1, or with tensor == 1 the model axis)."""
    data: int = 1
    """Data-parallel size (ZeRO shards over it)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    recompute: str = "none"
    """train.recompute: none | selective | full."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (tensor > 1)."""

    @property
    def model_axis(self) -> int:
        return self.tensor if self.tensor > 1 else self.head

    @property
    def world(self) -> int:
        return self.model_axis * self.pipeline * self.data

    @property
    def local_engine(self) -> bool:
        """One process: `mtp train` uses LocalEngine (plain torch AdamW), not DeepSpeed."""
        return self.world == 1

    def name(self) -> str:
        parts = [f"tp{self.tensor}", f"pp{self.pipeline}", f"dp{self.data}"]
        if self.head > 1:
            parts.append(f"head{self.head}")
        parts.append(f"zero{self.zero_stage}")
        if self.sequence_parallel:
            parts.append("sp")
        return "-".join(parts) + f"-{self.recompute}"


def layout_misfit(cfg: RunConfig, gpus: int) -> str | None:
    """Why cfg.parallel's layout cannot use `gpus` ranks (None: it can)."""
    p = cfg.parallel
    model = p.tensor if p.tensor > 1 else p.head
    if gpus % (model * p.pipeline):
        return (
            f"the recipe's layout (model-parallel {model} x pipeline {p.pipeline}) does not "
            f"divide {gpus} GPUs"
        )
    return None


def layout_of(cfg: RunConfig, gpus: int) -> Layout:
    """The layout cfg.parallel asks for on `gpus` ranks (data = what is left)."""
    misfit = layout_misfit(cfg, gpus)
    if misfit:
        raise ConfigError(misfit)
    p = cfg.parallel
    model = p.tensor if p.tensor > 1 else p.head
    return Layout(
        tensor=p.tensor,
        pipeline=p.pipeline,
        head=p.head,
        data=gpus // (model * p.pipeline),
        zero_stage=p.zero_stage,
        recompute=cfg.train.recompute,
        sequence_parallel=p.sequence_parallel,
    )


def check_layout(cfg: RunConfig, lay: Layout) -> str | None:
    """Why `lay` cannot run `cfg` (None: it can), the checks mtp train makes."""
    m = cfg.model
    t = lay.tensor
    if lay.head > 1 and t > 1 and lay.head != t:
        return "head must be 1 or equal to tensor"
    if lay.head > m.n_future:
        return f"head {lay.head} > n_future {m.n_future}"
    if m.chained and lay.head > 1:  # config.validate's rule: module k reads module k-1
        return "head parallelism does not apply to model.mtp_arch=chained"
    if m.n_attn_heads % t or m.kv_heads % t or m.ffn_width % t or vocab_size(cfg) % t:
        return f"attention heads, kv heads, ffn width and vocab must divide by tensor {t}"
    if lay.pipeline > 1 and lay.zero_stage >= 2:
        return "ZeRO >= 2 with a pipeline"
    if lay.pipeline > m.trunk_layers + 2:
        return f"pipeline {lay.pipeline} > {m.trunk_layers + 2} pipeline layers"
    if lay.sequence_parallel and (t == 1 or cfg.data.seq_len % t or lay.head > 1):
        return "sequence parallelism needs tensor > 1, seq_len divisible by it, head = 1"
    if m.tie_embeddings and (lay.pipeline > 1 or lay.head > 1):
        return "tied embeddings need pipeline 1 and head 1"  # config.validate's rule
    return None


# ---------------------------------------------------------------- activations


def uses_bf16(cfg: RunConfig) -> bool:
    """bf16 as the engines decide it (`training.engine.uses_bf16`): 'bf16', or 'auto' on a
    GPU, which is what a plan is for unless train.device is 'cpu'."""
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and cfg.train.device != "cpu")


def layer_activation_elements(cfg: RunConfig, lay: Layout, recompute: str) -> float:
    """Elements one trunk (or head) layer keeps for backward, per token of the micro-batch.

    Counted from the ops of `mtp_dist.model.layers.Block` (each saved tensor once):
    each RMSNorm keeps its input, the normalised x and its output (3d; the first norm's input
    is the layer input), plus one rsqrt per token; attention keeps q and k after rotary
    (dq + dkv, dq = H x head_dim, which an explicit model.head_dim makes differ from d), v
    (dkv), the attention output and its (B, T, dq) copy for wo (2dq), and SDPA's log-sum-exp
    (one per head per token: no (T, T) scores, unlike Megatron's unfused count); q/k/v biases
    save nothing more;
    the SwiGLU MLP keeps gate, SiLU(gate), up and their product (4f). Tensor parallelism
    splits what the column layers make (q, k, v, attention output, the MLP's 4f) by t;
    sequence parallelism splits the norms' share too. `selective` (the MLP recomputed) keeps
    the MLP's input, already one of the norm's 3d; `full` keeps the layer's input only."""
    m, t = cfg.model, lay.tensor
    d, f = m.d_model, m.ffn_width
    dq, dkv = m.n_attn_heads * m.attn_head_dim, m.kv_heads * m.attn_head_dim
    sp = t if lay.sequence_parallel else 1
    if recompute == "full":
        return d / sp
    norms = (6 * d + 2) / sp
    attn = (3 * dq + 2 * dkv + m.n_attn_heads) / t
    mlp = 0 if recompute == "selective" else 4 * f / t
    return norms + attn + mlp


def megatron_layer_activation_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, selective: bool = False
) -> float:
    """Megatron-LM's per-layer activation bytes (fp16, `theoretical_memory_usage.py`, from
    Korthikanti et al. 2022): s·b·h·(34 + 5·a·s/h), the 34 split by t only with sequence
    parallelism (24 of it otherwise), selective recompute removes the 5·a·s/h term. Kept as the
    anchor the plan reports beside its own count (GELU MLP, unfused attention, dropout)."""
    scores = 0 if selective else 5 * a * s / h
    if sp:
        return s * b * h * (34 + scores) / t
    return s * b * h * (10 + (24 + scores) / t)


def heads_elements(cfg: RunConfig, lay: Layout, graph_heads: int) -> dict[str, float]:
    """Peak elements per token the head loss adds on the last stage, by loss implementation.

    Per head: its layer's activations (never recomputed), and for the cross-entropy over the
    rank's V/t vocabulary the log-probabilities it saves (the logits are freed once
    log-softmax has run: the unembedding's backward does not need its output) and, in
    backward, the gradients of the log-probabilities and of the logits: 3·V/t per token while
    one head's loss is differentiated (measured: 3.06, torch's allocation events,
    tests/test_plan.py). sequential: one head at a time (+ h and its gradient buffer, 2d; a
    frozen trunk wants no gradient of h: d); naive: every head's layer and log-probabilities
    alive until backward (V/t each), plus the two gradients of the head being differentiated
    (measured at n = 4: 6.0 = 4 + 2); chunked: the sequential count without the 3·V/t term,
    which the caller adds over `chunk_tokens` tokens instead of the micro-batch (it does not
    scale with the micro-batch). `graph_heads`: the rank's heads whose loss is differentiated
    (a frozen head 1 is only evaluated, without a graph: it keeps nothing)."""
    if cfg.model.chained:
        return chain_elements(cfg, lay, graph_heads)
    m, t = cfg.model, lay.tensor
    v = vocab_size(cfg) / t
    layer = layer_activation_elements(cfg, lay, "none")
    if m.loss_impl == "naive":
        return {"layers": graph_heads * layer, "logits": graph_heads * v + 2 * v, "h": 0.0}
    h = (2 if trunk_trains(cfg) else 1) * m.d_model
    return {"layers": layer, "logits": 0.0 if m.loss_chunk else LOGIT_COPIES * v, "h": h}


def chain_elements(cfg: RunConfig, lay: Layout, graph_depths: int) -> dict[str, float]:
    """`heads_elements` of the chained family (mtp_dist/model/chain.py): depth 0's layer and the
    n-1 modules, each depth's graph kept until the reverse sweep (docs/sequential_heads.md).

    A depth whose loss is differentiated keeps its layer's activations and, for its output
    norm and output, 4d + 1: the norm's input, rsqrt and normalised x, the output and its
    gradient (the naive loss has no separate output gradient: 3d + 1). A module keeps more,
    5d + 2: its token's embedding, enorm's and hnorm's rsqrt and normalised x, and the
    (2d) concatenation eh_proj saves. A frozen depth 0 (`trunk_and_head1`) is evaluated
    without a graph and keeps its output only (d). These are the module's own activations
    (`modules`); the rest as the parallel heads: sequential, one depth's 3V' (chunked: over
    a chunk, added by the caller) and the trunk output h with its gradient; naive, every
    differentiated depth's log-probabilities plus two gradients. The chain's norms and
    eh_proj run on this rank's positions (÷t under sequence parallelism); the projection
    gathers them (V' per token of the whole micro-batch, as the parallel heads)."""
    m, t = cfg.model, lay.tensor
    d, v, n = m.d_model, vocab_size(cfg) / t, m.n_future
    sp = t if lay.sequence_parallel else 1
    layer = layer_activation_elements(cfg, lay, "none")
    naive = m.loss_impl == "naive"
    depth = layer + (3 * d + 1 if naive else 4 * d + 1) / sp
    kept = graph_depths * depth + (n - graph_depths) * d / sp + (n - 1) * (5 * d + 2) / sp
    if naive:
        return {"modules": kept, "logits": graph_depths * v + 2 * v, "h": 0.0}
    h = (2 if trunk_trains(cfg) else 1) * d
    return {"modules": kept, "logits": 0.0 if m.loss_chunk else LOGIT_COPIES * v, "h": h}


DS_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default `reduce_bucket_size` (elements; mtp_dist.distributed.engine does not
set it). ZeRO 1 and 2 with contiguous gradients (their default) allocate one bucket of it at
the start of every backward (`setup_buckets`), whatever the model's size."""


def bucket_bytes(lay: Layout, bf16: bool) -> int:
    """DeepSpeed ZeRO 1/2's gradient-reduction bucket: fp32 for ZeRO 1 (its fp32 gradient
    accumulator), the training precision for ZeRO 2; none for the other engines."""
    if lay.local_engine or lay.zero_stage not in (1, 2):
        return 0
    return DS_REDUCE_BUCKET * (4 if lay.zero_stage == 1 or not bf16 else 2)


LOGIT_COPIES = 3
"""Vocabulary-sized tensors per token while one head's cross-entropy is differentiated."""


def chunk_tokens(cfg: RunConfig) -> int:
    """Tokens per cross-entropy chunk: whole positions of the micro-batch, at least one."""
    b = cfg.train.micro_batch_size
    return max(1, cfg.model.loss_chunk // b) * b if cfg.model.loss_chunk else 0


# ---------------------------------------------------------------- the report


@dataclass(kw_only=True)
class RankMemory:
    """One pipeline stage's rank, in bytes."""

    stage: int
    params: int
    trainable_params: int
    """Of `params`, those that train (train.freeze): the ones with gradients and optimizer state."""
    weights: int
    gradients: int
    optimizer: int
    activations_per_layer: int
    trunk_layers: int
    in_flight: int
    """Micro-batches whose activations the stage holds at once (1F1B: pipeline - stage)."""
    activations: int
    """What the stage's trunk layers keep for backward (all micro-batches in flight); none when
    the trunk is frozen (it runs without autograd)."""
    workspace: int
    """The trunk backward's transient: one layer's gradients (a recomputed layer: its
    re-made activations too). Not alive with the heads' peak, which comes first. None when the
    trunk is frozen: it has no backward."""
    heads: int
    buckets: int
    """DeepSpeed's gradient-reduction bucket (`bucket_bytes`), alive through the backward."""
    total: int
    """Model states + `step` (set by plan_layout from the fields above)."""

    @property
    def step(self) -> int:
        """Bytes the step adds at its peak on top of the model states."""
        return self.activations + self.buckets + max(self.workspace, self.heads)


@dataclass(kw_only=True)
class LayoutPlan:
    layout: Layout
    error: str | None
    ranks: list[RankMemory] = field(default_factory=list)
    peak_bytes: int = 0
    fits: bool = False


def plan_layout(
    cfg: RunConfig, lay: Layout, memory_bytes: float, counts: ParamCounts
) -> LayoutPlan:
    """Per-stage memory of `lay`, the worst stage's total against `memory_bytes`."""
    error = check_layout(cfg, lay)
    if error:
        return LayoutPlan(layout=lay, error=error)
    bf16 = uses_bf16(cfg)
    act_bytes = 2 if bf16 else 8 if cfg.train.precision == "fp64" else 4
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    _, graph_heads = head_share(cfg, lay)
    # A frozen trunk runs without autograd: it keeps nothing and has no backward.
    keeps = 1 if trunk_trains(cfg) else 0
    per_layer = keeps * layer_activation_elements(cfg, lay, lay.recompute) * tokens * act_bytes
    full_layer = keeps * layer_activation_elements(cfg, lay, "none") * tokens * act_bytes
    ranks = []
    for stage, (_, n_layers, has_heads) in enumerate(
        stage_layers(cfg.model.trunk_layers, lay.pipeline)
    ):
        params, trainable = rank_param_counts(cfg, lay, stage)
        states = model_state_bytes(params, lay, bf16, counts.largest_layer, trainable,
                                   counts.largest_trainable)  # fmt: skip
        in_flight = min(lay.pipeline - stage, cfg.train.grad_accum_steps) if lay.pipeline > 1 else 1
        # Backward of a layer makes gradients as large as what it kept; a recomputed layer
        # first re-makes its activations, then their gradients: one or two layers' worth.
        workspace = (1 if lay.recompute == "none" else 2) * full_layer if n_layers else 0
        acts = int(per_layer * n_layers * in_flight)
        heads = 0
        if has_heads:
            h = heads_elements(cfg, lay, graph_heads)
            chunk = chunk_tokens(cfg) * LOGIT_COPIES * vocab_size(cfg) / lay.tensor
            # + the unembedding weight's gradient for one head, made before it is accumulated
            # (none when that matrix is frozen)
            weight_grad = vocab_size(cfg) / lay.tensor * cfg.model.d_model
            weight_grad *= projection_trains(cfg)
            heads = int((sum(h.values()) * tokens + chunk + weight_grad) * act_bytes)
        # The heads run (forward and backward) before the trunk's backward starts: their peak
        # and the trunk backward's workspace are not alive at once.
        rank = RankMemory(stage=stage, params=params, trainable_params=trainable, **states,
                          activations_per_layer=int(per_layer), trunk_layers=n_layers,
                          in_flight=in_flight, activations=acts, workspace=int(workspace),
                          heads=heads, buckets=bucket_bytes(lay, bf16), total=0)  # fmt: skip
        rank.total = sum(states.values()) + rank.step
        ranks.append(rank)
    peak = max(r.total for r in ranks)
    return LayoutPlan(
        layout=lay, error=None, ranks=ranks, peak_bytes=peak, fits=peak <= memory_bytes
    )


@dataclass(frozen=True, kw_only=True)
class Hardware:
    gpus: int
    """Ranks (one GPU each)."""
    memory_gb: float
    """Memory per GPU, GB (1e9 bytes)."""
    tflops: float
    """Peak dense TFLOP/s per GPU at the training precision."""
    mfu: float
    """Model FLOPs utilisation assumed (model FLOPs / peak)."""


def flops_per_token(cfg: RunConfig, counts: ParamCounts) -> dict[str, float]:
    """Training FLOPs per token. A layer's forward: 2 per matmul weight, plus attention's QK^T
    and AV, 4·s·dq (dq = H x head_dim; non-causal, as Megatron and PaLM count); its backward
    twice that (the input's gradient and the weights'). The trunk's layers once, the head
    layers and the unembedding n times (each head runs its layer and the unembedding on every
    token). The embedding lookup, norms and biases are no matmuls.

    Frozen parts (train.freeze) skip their backward: a frozen trunk runs its forward only (1x,
    not 3x), so does a frozen head 1; a frozen unembedding (or a tied one under 'trunk') still
    passes the gradient to the heads that train (2 + 2 per weight, no weight gradient).
    `hardware` adds the forward re-run by recompute (selective: the MLP's 3·d·f; full: the
    whole trunk layer); a frozen trunk is not recomputed.

    The chained family: depth 0 and the n-1 modules are the n head layers, each projected by
    U; a module adds its eh_proj (d x 2d, forward and backward: modules train in every freeze
    mode) and an embedding lookup (no matmul)."""
    m, s = cfg.model, cfg.data.seq_len
    n, layers = m.n_future, m.trunk_layers
    forward = 2 * counts.layer_matmul + 4 * s * m.n_attn_heads * m.attn_head_dim
    graph = n - (cfg.train.freeze == "trunk_and_head1")  # heads whose loss is differentiated
    trunk = layers * forward * (3 if trunk_trains(cfg) else 1)
    heads = graph * 3 * forward + (n - graph) * forward
    u = counts.unembed_matmul
    unembed = 2 * u * n + 2 * u * graph * (1 + projection_trains(cfg))
    eh_proj = 0
    if m.chained:  # modules 1..n-1: a layer's matmuls and eh_proj's
        eh_proj = (n - 1) * 6 * (counts.module_matmul - counts.layer_matmul)
    model = trunk + heads + unembed + eh_proj
    rerun = {
        "none": 0.0,
        "selective": 2 * 3 * m.d_model * m.ffn_width,
        "full": forward,
    }[cfg.train.recompute] * trunk_trains(cfg)
    return {"model": float(model), "hardware": float(model + layers * rerun)}


@dataclass(kw_only=True)
class Plan:
    recipe: str
    hardware: Hardware
    tokens_budget: float
    params_total: int
    trainable_params: int
    """Parameters that train under `freeze` (the rest: weights only)."""
    freeze: str
    """train.freeze."""
    mtp_arch: str
    """model.mtp_arch: 'parallel' heads or 'chained' modules."""
    vocab_size: int
    tokens_per_step: int | None
    flops_per_token: float
    hardware_flops_per_token: float
    step_seconds: float | None
    """Of the recipe's layout (None without one: `tokens_per_step` needs its data size)."""
    tokens_per_day: float
    """Per-GPU throughput times the GPUs: the same for every layout."""
    days_to_budget: float
    layout: LayoutPlan | None
    """The recipe's layout, None when it does not divide the GPUs (`layout_misfit`)."""
    layout_misfit: str | None
    candidates: list[LayoutPlan]


def candidate_layouts(cfg: RunConfig, gpus: int) -> list[Layout]:
    """Tensor and pipeline sizes that are powers of two dividing `gpus` (tensor <= 8: one
    node), head parallelism (tensor 1) over divisors of n_future, ZeRO 0-3, every recompute
    mode; sequence parallelism whenever tensor > 1."""
    out = []
    for t in (1, 2, 4, 8):
        for p in (1, 2, 4, 8, 16):
            heads = [h for h in range(1, cfg.model.n_future + 1) if cfg.model.n_future % h == 0]
            for h in heads if t == 1 else [1]:
                model = t if t > 1 else h
                if gpus % (model * p):
                    continue
                for z in range(4):
                    for r in RECOMPUTE_MODES:
                        out.append(
                            Layout(
                                tensor=t,
                                pipeline=p,
                                head=h,
                                data=gpus // (model * p),
                                zero_stage=z,
                                recompute=r,
                                sequence_parallel=t > 1,
                            )
                        )
    return out


def make_plan(cfg: RunConfig, hw: Hardware, tokens: float, recipe: str = "") -> Plan:
    """The plan of cfg's own layout on `hw`, and of every candidate layout. A recipe whose
    layout does not divide the GPUs is still planned: its candidates are what a user who has
    that many GPUs chooses from (`layout` None, `layout_misfit` says why)."""
    counts = param_counts(cfg)
    memory = hw.memory_gb * 1e9
    misfit = layout_misfit(cfg, hw.gpus)
    own = None
    if misfit is None:
        own = plan_layout(cfg, layout_of(cfg, hw.gpus), memory, counts)
        if own.error:
            raise ConfigError(f"layout {own.layout.name()}: {own.error}")
    cands = [plan_layout(cfg, c, memory, counts) for c in candidate_layouts(cfg, hw.gpus)]
    cands = [c for c in cands if c.error is None]
    if own is None and not cands:
        raise ConfigError(f"{misfit}, and no other layout the model can take does")
    fl = flops_per_token(cfg, counts)
    t = cfg.train
    # Tokens per day are the GPUs' FLOP/s over the FLOPs per token, whatever the layout; a step
    # (how many tokens, how long) needs the recipe's data-parallel size.
    per_day = hw.gpus * hw.tflops * 1e12 * hw.mfu / fl["model"] * 86400
    per_step = step = None
    if own is not None:
        per_step = t.micro_batch_size * t.grad_accum_steps * own.layout.data * cfg.data.seq_len
        step = per_step / per_day * 86400
    return Plan(
        recipe=recipe,
        hardware=hw,
        tokens_budget=tokens,
        params_total=counts.total,
        trainable_params=counts.trainable,
        freeze=cfg.train.freeze,
        mtp_arch=cfg.model.mtp_arch,
        vocab_size=vocab_size(cfg),
        tokens_per_step=per_step,
        flops_per_token=fl["model"],
        hardware_flops_per_token=fl["hardware"],
        step_seconds=step,
        tokens_per_day=per_day,
        days_to_budget=tokens / per_day,
        layout=own,
        layout_misfit=misfit,
        candidates=cands,
    )


def to_json(plan: Plan) -> dict:
    """The plan as plain data (keys: docs/plan.md)."""

    def lp(p: LayoutPlan) -> dict:
        return {
            "name": p.layout.name(),
            **dataclasses.asdict(p.layout),
            "fits": p.fits,
            "peak_bytes": p.peak_bytes,
            "ranks": [dataclasses.asdict(r) for r in p.ranks],
        }

    out = dataclasses.asdict(plan)
    out["hardware"] = dataclasses.asdict(plan.hardware)
    out["layout"] = lp(plan.layout) if plan.layout else None
    out["candidates"] = [lp(c) for c in plan.candidates]
    return out
