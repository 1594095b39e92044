"""The memory and time planner behind `mtp plan`: pure functions over a RunConfig and a layout.

Per rank: bytes of weights, gradients and optimizer state (by engine, ZeRO stage and precision),
of activations (per trunk layer, by tensor / sequence parallelism, pipeline schedule and
recompute) and of the heads' loss (sequential, naive or chunked); then the FLOPs per token
(the n heads and the unembedding counted n times), the step time at a given MFU, tokens per day
and days to a token budget. No process group, no model weights: the parameter shapes come from
the parameter table (`mtp_dist.model.parameter_table`, built on the meta device).

The formulas, what they count and where they agree with Megatron-LM's
`theoretical_memory_usage.py` and DeepSpeed's `estimate_zero*_model_states_mem_needs`:
docs/plan.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import ConfigError, RunConfig

BYTE_VOCAB = 259  # mtp_dist.tokenizers.byte.ByteTokenizer: 256 bytes + BOS, EOS, PAD
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


def layout_of(cfg: RunConfig, gpus: int) -> Layout:
    """The layout cfg.parallel asks for on `gpus` ranks (data = what is left)."""
    p = cfg.parallel
    model = p.tensor if p.tensor > 1 else p.head
    if gpus % (model * p.pipeline):
        raise ConfigError(
            f"--gpus {gpus} is not divisible by model-parallel {model} x pipeline {p.pipeline}"
        )
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
    if m.n_attn_heads % t or m.kv_heads % t or m.ffn_width % t or vocab_size(cfg) % t:
        return f"attention heads, kv heads, ffn width and vocab must divide by tensor {t}"
    if lay.pipeline > 1 and lay.zero_stage >= 2:
        return "ZeRO >= 2 with a pipeline"
    if lay.pipeline > m.trunk_layers + 2:
        return f"pipeline {lay.pipeline} > {m.trunk_layers + 2} pipeline layers"
    if lay.sequence_parallel and (t == 1 or cfg.data.seq_len % t or lay.head > 1):
        return "sequence parallelism needs tensor > 1, seq_len divisible by it, head = 1"
    return None


def vocab_size(cfg: RunConfig) -> int:
    """model.vocab_size, or what the tokenizer will give it (0 means 'from the tokenizer')."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    return BYTE_VOCAB if cfg.data.tokenizer == "bytes" else cfg.data.sp_vocab_size


# ---------------------------------------------------------------- parameters per rank


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameters of the whole model by part, and what the worst rank holds."""

    embed: int
    trunk_layer: int
    head_layer: int
    unembed: int
    total: int
    largest_layer: int
    """Largest single module's parameters (the unembedding or embedding, usually): what
    ZeRO-3 gathers whole at once (DeepSpeed's `largest_layer_params`)."""


def param_counts(cfg: RunConfig) -> ParamCounts:
    from .model import parameter_table  # torch import: only when a plan is made

    table = parameter_table(dataclasses.replace(cfg.model, vocab_size=vocab_size(cfg)))
    by: dict[tuple[str, int | None], int] = {}
    for spec in table.values():
        key = (spec.owner.kind, spec.owner.index)
        by[key] = by.get(key, 0) + math.prod(spec.shape)
    trunk = [v for (k, _), v in by.items() if k == "trunk"]
    heads = [v for (k, _), v in by.items() if k == "head"]
    return ParamCounts(
        embed=by[("embed", None)],
        trunk_layer=trunk[0] if trunk else 0,
        head_layer=heads[0],
        unembed=by[("unembed", None)],
        total=sum(by.values()),
        largest_layer=max(by.values()),
    )


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


def _split(count_split: int, count_replicated: int, t: int) -> int:
    return count_split // t + count_replicated


def rank_params(cfg: RunConfig, lay: Layout, stage: int) -> int:
    """Parameters one rank of pipeline stage `stage` holds (before ZeRO-3 sharding): its
    stage's modules, 1/tensor of every tensor-split weight (norms whole), its head group's
    share of the heads (ceil(n / head)) and the shared unembedding."""
    m, t = cfg.model, lay.tensor
    d, f, v, dkv = (
        m.d_model,
        m.ffn_width,
        vocab_size(cfg),
        m.kv_heads * (m.d_model // m.n_attn_heads),
    )
    layer = _split(
        2 * d * d + 2 * d * dkv + 3 * d * f, 2 * d, t
    )  # q, o, k, v, gate/up/down; 2 norms
    embed, trunk, heads = stage_layers(m.trunk_layers, lay.pipeline)[stage]
    out = trunk * layer
    if embed:
        out += v * d // t
    if heads:
        per_rank = m.n_future if t > 1 else math.ceil(m.n_future / lay.head)
        out += per_rank * layer + _split(v * d, d, t)
    return out


# ---------------------------------------------------------------- model states


def model_state_bytes(params: int, lay: Layout, bf16: bool, largest: int) -> dict[str, int]:
    """Weights, gradients, optimizer state (AdamW) of one rank holding `params` parameters.

    One process (LocalEngine): fp32 weights (bf16 is autocast), fp32 gradients, two fp32
    moments: 4 + 4 + 8 bytes per parameter. DeepSpeed (bytes per parameter, N = data):
    stage 0: w, w (+4 fp32 gradients under bf16), 8 (+4 fp32 master under bf16);
    stage 1: w, w + 4/N, 12/N (fp32 master + moments sharded; DeepSpeed keeps an fp32 master
    partition and an fp32 gradient partition even when w is 4);
    stage 2: w, (w + 4)/N, 12/N; stage 3: w/N + the largest module gathered with its gradient
    (2w x largest), 4/N, 12/N. At bf16 (w = 2) stages 2 and 3 are DeepSpeed's estimators:
    2P + 18P/N and 18P/N + 4 x largest."""
    if lay.local_engine:
        return {"weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params}
    w, n, z = (2 if bf16 else 4), lay.data, lay.zero_stage
    if z == 0:
        extra = 4 * params if bf16 else 0
        return {
            "weights": w * params,
            "gradients": w * params + extra,
            "optimizer": 8 * params + extra,
        }
    opt = 12 * params // n
    if z == 1:
        return {"weights": w * params, "gradients": w * params + 4 * params // n, "optimizer": opt}
    if z == 2:
        return {"weights": w * params, "gradients": (w + 4) * params // n, "optimizer": opt}
    return {
        "weights": w * params // n + 2 * w * largest,
        "gradients": 4 * params // n,
        "optimizer": opt,
    }


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
    (d + dkv), v (dkv), the attention output and its (B, T, d) copy for wo (2d), and SDPA's
    log-sum-exp (one per head per token: no (T, T) scores, unlike Megatron's unfused count);
    the SwiGLU MLP keeps gate, SiLU(gate), up and their product (4f). Tensor parallelism
    splits what the column layers make (q, k, v, attention output, the MLP's 4f) by t;
    sequence parallelism splits the norms' share too. `selective` (the MLP recomputed) keeps
    the MLP's input, already one of the norm's 3d; `full` keeps the layer's input only."""
    m, t = cfg.model, lay.tensor
    d, f = m.d_model, m.ffn_width
    dkv = m.kv_heads * (d // m.n_attn_heads)
    sp = t if lay.sequence_parallel else 1
    if recompute == "full":
        return d / sp
    norms = (6 * d + 2) / sp
    attn = (3 * d + 2 * dkv + m.n_attn_heads) / t
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


def heads_elements(cfg: RunConfig, lay: Layout, heads_here: int) -> dict[str, float]:
    """Peak elements per token the head loss adds on the last stage, by loss implementation.

    Per head: its layer's activations (never recomputed), and for the cross-entropy over the
    rank's V/t vocabulary the log-probabilities it saves (the logits are freed once
    log-softmax has run: the unembedding's backward does not need its output) and, in
    backward, the gradients of the log-probabilities and of the logits: 3·V/t per token while
    one head's loss is differentiated (measured: 3.06, torch's allocation events,
    tests/test_plan.py). sequential: one head at a time (+ h and its gradient buffer, 2d); naive:
    every head's layer and log-probabilities alive until backward (V/t each), plus the two
    gradients of the head being differentiated (measured at n = 4: 6.0 = 4 + 2); chunked: the
    sequential count without the 3·V/t term, which the caller adds over `chunk_tokens`
    tokens instead of the micro-batch (it does not scale with the micro-batch)."""
    m, t = cfg.model, lay.tensor
    v = vocab_size(cfg) / t
    layer = layer_activation_elements(cfg, lay, "none")
    if m.loss_impl == "naive":
        return {"layers": heads_here * layer, "logits": heads_here * v + 2 * v, "h": 0.0}
    return {"layers": layer, "logits": 0.0 if m.loss_chunk else LOGIT_COPIES * v,
            "h": 2 * m.d_model}  # fmt: skip


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
    weights: int
    gradients: int
    optimizer: int
    activations_per_layer: int
    trunk_layers: int
    in_flight: int
    """Micro-batches whose activations the stage holds at once (1F1B: pipeline - stage)."""
    activations: int
    """What the stage's trunk layers keep for backward (all micro-batches in flight)."""
    workspace: int
    """The trunk backward's transient: one layer's gradients (a recomputed layer: its
    re-made activations too). Not alive with the heads' peak, which comes first."""
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
    heads_here = cfg.model.n_future if lay.tensor > 1 else math.ceil(cfg.model.n_future / lay.head)
    per_layer = layer_activation_elements(cfg, lay, lay.recompute) * tokens * act_bytes
    full_layer = layer_activation_elements(cfg, lay, "none") * tokens * act_bytes
    ranks = []
    for stage, (_, n_layers, has_heads) in enumerate(
        stage_layers(cfg.model.trunk_layers, lay.pipeline)
    ):
        params = rank_params(cfg, lay, stage)
        states = model_state_bytes(params, lay, bf16, counts.largest_layer)
        in_flight = min(lay.pipeline - stage, cfg.train.grad_accum_steps) if lay.pipeline > 1 else 1
        # Backward of a layer makes gradients as large as what it kept; a recomputed layer
        # first re-makes its activations, then their gradients: one or two layers' worth.
        workspace = (1 if lay.recompute == "none" else 2) * full_layer if n_layers else 0
        acts = int(per_layer * n_layers * in_flight)
        heads = 0
        if has_heads:
            h = heads_elements(cfg, lay, heads_here)
            chunk = chunk_tokens(cfg) * LOGIT_COPIES * vocab_size(cfg) / lay.tensor
            # + the unembedding weight's gradient for one head, made before it is accumulated
            weight_grad = vocab_size(cfg) / lay.tensor * cfg.model.d_model
            heads = int((sum(h.values()) * tokens + chunk + weight_grad) * act_bytes)
        # The heads run (forward and backward) before the trunk's backward starts: their peak
        # and the trunk backward's workspace are not alive at once.
        rank = RankMemory(stage=stage, params=params, **states,
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
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) for the trunk,
    and n times for the head layers and the unembedding (each head runs its layer and the
    unembedding on every token), plus attention's QK^T and AV, 12·s·d per layer (non-causal,
    as Megatron and PaLM count). The embedding lookup is no matmul. `hardware` adds the
    forward re-run by recompute (selective: the MLP's 3·d·f; full: the whole trunk layer)."""
    m, s = cfg.model, cfg.data.seq_len
    n, d = m.n_future, m.d_model
    matmul = m.trunk_layers * (counts.trunk_layer - 2 * d) + n * (counts.head_layer - 2 * d)
    matmul += n * (counts.unembed - d)
    attn = 12 * s * d * (m.trunk_layers + n)
    model = 6 * matmul + attn
    rerun = {
        "none": 0.0,
        "selective": 2 * 3 * d * m.ffn_width,
        "full": 2 * (counts.trunk_layer - 2 * d) + 4 * s * d,
    }[cfg.train.recompute]
    return {"model": float(model), "hardware": float(model + m.trunk_layers * rerun)}


@dataclass(kw_only=True)
class Plan:
    recipe: str
    hardware: Hardware
    tokens_budget: float
    params_total: int
    vocab_size: int
    tokens_per_step: int
    flops_per_token: float
    hardware_flops_per_token: float
    step_seconds: float
    tokens_per_day: float
    days_to_budget: float
    layout: LayoutPlan
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
    """The plan of cfg's own layout on `hw`, and of every candidate layout."""
    counts = param_counts(cfg)
    memory = hw.memory_gb * 1e9
    lay = layout_of(cfg, hw.gpus)
    own = plan_layout(cfg, lay, memory, counts)
    if own.error:
        raise ConfigError(f"layout {lay.name()}: {own.error}")
    cands = [plan_layout(cfg, c, memory, counts) for c in candidate_layouts(cfg, hw.gpus)]
    fl = flops_per_token(cfg, counts)
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum_steps * lay.data * cfg.data.seq_len
    step = per_step * fl["model"] / (hw.gpus * hw.tflops * 1e12 * hw.mfu)
    per_day = per_step / step * 86400
    return Plan(
        recipe=recipe,
        hardware=hw,
        tokens_budget=tokens,
        params_total=counts.total,
        vocab_size=vocab_size(cfg),
        tokens_per_step=per_step,
        flops_per_token=fl["model"],
        hardware_flops_per_token=fl["hardware"],
        step_seconds=step,
        tokens_per_day=per_day,
        days_to_budget=tokens / per_day,
        layout=own,
        candidates=[c for c in cands if c.error is None],
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
    out["layout"] = lp(plan.layout)
    out["candidates"] = [lp(c) for c in plan.candidates]
    return out
