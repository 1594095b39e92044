"""The one configuration schema of mtp_dist.

Typed omegaconf structured configs: every recipe in configs/ is a YAML file merged onto these
dataclasses, and the CLI adds `key=value` dotlist overrides. A wrong key or type fails with a
one-line `ConfigError` naming the key; `validate` checks the arithmetic omegaconf cannot.

A recipe is a YAML path or the name of a shipped recipe (`tiny-cpu`): the files of configs/,
which an installed package carries as `mtp_dist/recipes` (pyproject.toml maps the directory).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml  # omegaconf's own YAML library: its errors are what an unreadable value raises
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, reported in one line that names the offending key."""


@dataclass(kw_only=True)
class RopeScalingConfig:
    type: str = "none"
    """'none', or 'llama3' (Llama 3.1+: long wavelengths divided by `factor`, short ones kept,
    a smooth ramp between; transformers' `_compute_llama3_parameters`)."""
    factor: float = 8.0
    """llama3: how much the low-frequency wavelengths are stretched."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_max_position_embeddings / this are scaled."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_max_position_embeddings / this are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context the model was pretrained at before the extension."""


DEFAULT_CHAIN_LOSS_WEIGHT = 0.3


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 means 'take it from the tokenizer' (the usual case)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Transformer layers of the equivalent next-token model (trunk + its one head layer)."""
    n_attn_heads: int = 4
    """Attention heads per layer (d_model must be divisible by it)."""
    n_kv_heads: int = 0
    """Key/value heads per layer, grouped-query attention (Llama-2-70B, Llama 3): each serves
    n_attn_heads / n_kv_heads query heads. 0 = n_attn_heads (multi-head attention)."""
    ffn_hidden: int = 0
    """SwiGLU hidden width; 0 means the Llama rule: 2/3 * 4 * d_model rounded up to 64."""
    n_future: int = 4
    """Number of output heads n; head i predicts token t+i. n=1 is the next-token baseline."""
    mtp_arch: str = "parallel"
    """'parallel' (the paper: n independent heads on the trunk) or 'chained' (DeepSeek-V3,
    GLM-4.5: the next-token model plus n-1 modules, module k reading module k-1's hidden state
    and the embedding of token t+k; mtp_dist/model/chain.py)."""
    mtp_loss_weight: float | None = None
    """lambda of the chained loss CE_main + lambda * mean_k CE_k; None = 0.3 (DeepSeek-V3's
    first phase; it drops to 0.1 later, Megatron-core's default is 0.1). The parallel family's
    loss is the paper's plain sum of the heads' CEs and takes no weight."""
    parameter_matched: bool = True
    """Take the n-1 extra head layers out of the trunk so total layers stay n_layers."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables cover (training context and generation limit)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """Rotary frequency scaling of an imported model (Llama 3.1+); 'none' for our own."""
    head_dim: int = 0
    """Width of one attention head; 0 = d_model / n_attn_heads. An explicit value (a Hugging
    Face config's `head_dim`) may differ from that: q/k/v are n_heads * head_dim wide."""
    attn_bias: bool = False
    """Biases on the q/k/v projections (Qwen2); o and the MLP have none."""
    tie_embeddings: bool = False
    """The unembedding is the input embedding's matrix (Llama-3.2-1B, SmolLM2): one tensor,
    `embed.weight`, trained by both uses. Not with parallel.pipeline > 1 or parallel.head > 1."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    pad_id: int = -1
    """Token whose labels are ignored (the tokenizer's PAD; -1 = take it from the tokenizer)."""
    loss_impl: str = "sequential"
    """'sequential' (one head's logits alive at a time) or 'naive' (all heads in one graph)."""
    loss_chunk: int = 0
    """Tokens per cross-entropy chunk inside each head (0 = off): the final norm, unembedding
    and cross-entropy run on about this many tokens at a time (whole sequence positions of
    the micro-batch, at least one), forward and backward, so a head's logits never exist
    whole. Same loss and gradients; docs/sequential_heads.md."""

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_attn_heads

    @property
    def chained(self) -> bool:
        return self.mtp_arch == "chained"

    @property
    def chain_loss_weight(self) -> float:
        return DEFAULT_CHAIN_LOSS_WEIGHT if self.mtp_loss_weight is None else self.mtp_loss_weight

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_attn_heads

    @property
    def trunk_layers(self) -> int:
        extra = self.n_future if self.parameter_matched else 1
        return self.n_layers - extra

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64


@dataclass(kw_only=True)
class DataConfig:
    source: str = "stdlib"
    """'stdlib' (the running interpreter's standard library .py files) or a directory/file path."""
    include: list[str] = field(default_factory=lambda: ["**/*.py"])
    """Glob patterns of files taken from a directory source."""
    tokenizer: str = "sentencepiece"
    """'bytes', 'sentencepiece' (trained on the corpus on first run unless tokenizer_path) or
    'hf' (a checkpoint's own Hugging Face tokenizer: tokenizer_path names a directory holding
    tokenizer.json + tokenizer_config.json, e.g. a model's)."""
    tokenizer_path: str | None = None
    """Directory of a saved tokenizer to use instead of training one."""
    sp_vocab_size: int = 4096
    """Vocabulary size when the project trains the sentencepiece model itself."""
    seq_len: int = 128
    """Trunk context in tokens; each sample carries seq_len + n_future tokens."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation."""
    shards_dir: str | None = None
    """Where packed shards live; default <run_dir>/data."""
    num_workers: int = 0
    """DataLoader worker processes for the reader."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    """Seed for weights, data order and every RNG."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    precision: str = "auto"
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32', 'bf16' or 'fp64' (tests)."""
    log_every: int = 10
    """Steps between progress/metric lines."""
    eval_every: int = 100
    """Steps between validation runs; 0 disables."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    ckpt_every: int = 100
    """Steps between checkpoints; the final step is always saved."""
    keep_last: int = 3
    """Checkpoints kept on disk."""
    max_bad_steps: int = 5
    """Consecutive NaN/inf-loss steps tolerated (skipped) before aborting."""
    freeze: str = "none"
    """Parameters that do not train (no gradient, no optimizer state, no ZeRO partition):
    'none'; 'trunk' (the embedding and the trunk layers: heads, final norm and unembedding
    train); 'trunk_and_head1' (everything of the next-token model: only heads 2..n train, and
    the next-token model stays bit-identical). A tied unembedding is the embedding, so under
    'trunk' it is frozen with it."""
    recompute: str = "none"
    """Activation recompute of the trunk layers (the same gradients for less memory and more
    time): 'none'; 'selective' (each trunk layer's MLP, the largest activations of a layer,
    is re-run in backward); 'full' (each trunk layer keeps only its input). The heads are
    never recomputed (docs/recompute.md)."""


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    uri: str | None = None
    """Tracking URI; default env MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db."""
    experiment: str = "mtp_dist"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; default the run directory's name."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (Megatron-core)."""
    pipeline: int = 1
    """Pipeline-parallel stages (DeepSpeed pipeline engine)."""
    head: int = 1
    """Head-parallel size: output heads spread over this many ranks of the last stage."""
    sequence_parallel: bool = False
    """Megatron-style sequence parallelism with tensor parallelism: norms and the residual
    stream hold 1/tensor of the sequence (needs tensor > 1, data.seq_len divisible by tensor,
    tensor-parallel heads, i.e. head = 1)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0 = plain data parallel)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on GPU, gloo on CPU), 'gloo' or 'nccl'."""
    timeout_s: float = 1800.0
    """Seconds a collective (or process-group setup) may wait for a peer before it raises;
    every process group gets it. A dead link or host then fails the job after this long
    instead of hanging (the torch default is 1800). Too small fails slow but healthy steps."""


@dataclass(kw_only=True)
class RunConfig:
    run_dir: str = MISSING
    """Directory holding checkpoints, logs, tokenizer, shards and the MLflow database."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


FROZEN_OWNERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "trunk": ("embed", "trunk"),
    "trunk_and_head1": ("embed", "trunk", "head 0", "unembed"),
}
"""Parameter-table owners (`str(Owner)`: a kind, or 'head i') each train.freeze mode freezes:
the one rule that training (mtp_dist/training/freeze.py) and the planner (plan_params.py)
apply."""


def freezes(mode: str, owner) -> bool:
    """Whether `train.freeze=mode` freezes the parameters of `owner` (a parameter-table Owner)."""
    return owner.kind in FROZEN_OWNERS[mode] or str(owner) in FROZEN_OWNERS[mode]


_CHOICES = {
    "model.loss_impl": ("sequential", "naive"),
    "model.mtp_arch": ("parallel", "chained"),
    "data.tokenizer": ("bytes", "sentencepiece", "hf"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16", "fp64"),
    "train.recompute": ("none", "selective", "full"),
    "train.freeze": tuple(FROZEN_OWNERS),
    "model.rope_scaling.type": ("none", "llama3"),
    "parallel.backend": ("auto", "gloo", "nccl"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    """Check what the types cannot: ranges, divisibility, choices. Raises ConfigError."""
    m, d, t = cfg.model, cfg.data, cfg.train

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why} (got {_get(cfg, key)!r})")

    for key, choices in _CHOICES.items():
        need(_get(cfg, key) in choices, key, f"must be one of {', '.join(choices)}")
    need(m.n_future >= 1, "model.n_future", "must be >= 1")
    need(m.d_model >= 1, "model.d_model", "must be >= 1")
    need(m.n_attn_heads >= 1, "model.n_attn_heads", "must be >= 1")
    need(m.head_dim >= 0, "model.head_dim", "must be >= 0 (0 = d_model / n_attn_heads)")
    if m.head_dim == 0:
        need(m.d_model % m.n_attn_heads == 0, "model.d_model", "must be divisible by n_attn_heads")
        need((m.d_model // m.n_attn_heads) % 2 == 0, "model.n_attn_heads", "head dim must be even")
    else:
        need(m.head_dim % 2 == 0, "model.head_dim", "must be even (rotary pairs)")
    if m.rope_scaling.type == "llama3":
        r, key = m.rope_scaling, "model.rope_scaling"
        need(r.factor >= 1, f"{key}.factor", "must be >= 1")
        need(
            0 < r.low_freq_factor < r.high_freq_factor,
            f"{key}.high_freq_factor",
            "must exceed low_freq_factor > 0",
        )
        need(
            r.original_max_position_embeddings >= 1,
            f"{key}.original_max_position_embeddings",
            "must be >= 1",
        )
    need(m.n_kv_heads >= 0, "model.n_kv_heads", "must be >= 0 (0 = n_attn_heads)")
    need(
        m.n_kv_heads == 0 or m.n_attn_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        f"must divide model.n_attn_heads={m.n_attn_heads}",
    )
    need(m.trunk_layers >= 0, "model.n_layers", f"too few layers for {m.n_future} heads")
    need(m.vocab_size >= 0, "model.vocab_size", "must be >= 0")
    need(m.loss_chunk >= 0, "model.loss_chunk", "must be >= 0 (0 = no chunking)")
    need(
        m.mtp_loss_weight is None or m.chained,
        "model.mtp_loss_weight",
        "weights the chained family's modules; the parallel family's loss is the plain sum",
    )
    need(
        m.mtp_loss_weight is None or m.mtp_loss_weight >= 0,
        "model.mtp_loss_weight",
        "must be >= 0",
    )
    need(d.seq_len >= 1, "data.seq_len", "must be >= 1")
    need(d.seq_len <= m.max_seq_len, "data.seq_len", f"exceeds model.max_seq_len={m.max_seq_len}")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    need(t.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    need(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(0 <= t.warmup_steps, "train.warmup_steps", "must be >= 0")
    need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(
        not (t.freeze == "trunk_and_head1" and m.n_future == 1),
        "train.freeze",
        "leaves nothing to train with model.n_future=1",
    )
    p = cfg.parallel
    if m.tie_embeddings:
        need(p.pipeline == 1, "model.tie_embeddings", "is not supported with parallel.pipeline > 1")
        need(p.head == 1, "model.tie_embeddings", "is not supported with parallel.head > 1")
    # A head-parallel rank holding head 1 alone trains nothing under 'trunk_and_head1'; it gets
    # placeholder parameters (training/freeze.py add_anchor), which ZeRO-3 does not run with:
    # it wants every rank to fetch the same modules in the same order, and that rank's
    # backward enters none.
    need(
        not (t.freeze == "trunk_and_head1" and p.head > 1 and p.zero_stage == 3)
        or m.n_future // p.head != 1,
        "train.freeze",
        f"trunk_and_head1 leaves the rank of head 1 (parallel.head={p.head}, model.n_future="
        f"{m.n_future}) nothing to train, which ZeRO-3 does not support: use "
        "parallel.zero_stage <= 2, or parallel.head <= n_future / 2",
    )
    need(
        not (m.chained and p.head > 1),
        "parallel.head",
        "does not apply to model.mtp_arch=chained (module k needs module k-1's output): use 1",
    )
    for key in ("tensor", "pipeline", "head"):
        need(getattr(p, key) >= 1, f"parallel.{key}", "must be >= 1")
    need(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
    need(p.timeout_s > 0, "parallel.timeout_s", "must be > 0")
    if p.sequence_parallel:
        sp = "parallel.sequence_parallel"
        need(p.tensor > 1, sp, "needs parallel.tensor > 1")
        need(p.head == 1, sp, "needs tensor-parallel heads (parallel.head=1)")
        need(d.seq_len % p.tensor == 0, sp, f"needs data.seq_len divisible by tensor={p.tensor}")
    return cfg


DEFAULT_RECIPE = "tiny-cpu"


def _recipes_dir() -> Traversable:
    # An installed package carries the recipes inside it; a source checkout (the editable
    # install included) reads configs/ itself, so an edited recipe is used without reinstalling.
    installed = resources.files("mtp_dist") / "recipes"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "configs"


def recipe_names() -> list[str]:
    """Names of the shipped recipes (`tiny-cpu`, ...), sorted."""
    root = _recipes_dir()
    if not root.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def find_recipe(recipe: str | Path) -> Traversable:
    """A YAML file, or a shipped recipe by name (`tiny-cpu` or `tiny-cpu.yaml`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.name.removesuffix(".yaml") in recipe_names():
        return _recipes_dir() / f"{path.name.removesuffix('.yaml')}.yaml"
    why = "is a directory" if path.is_dir() else "no such file"
    shipped = ", ".join(recipe_names()) or "none found"
    raise ConfigError(f"recipe {str(recipe)!r}: {why} (shipped recipes: {shipped})")


def _schema_type(key: str) -> Any:
    """The annotated type of a dotted key of RunConfig; None when it names no field (then
    omegaconf's own error names the key)."""
    node: Any = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def _override_value(key: str, text: str) -> Any:
    """The value of `key=text`: read as YAML, unless YAML cannot read it or reads something
    the key's type cannot hold, and then the text as typed (see load_config)."""
    try:
        # from_dotlist reads the value exactly as omegaconf reads a recipe's (1e-3 is a float).
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except yaml.YAMLError:  # `*.py` (an alias), `[1,2` (an unclosed list), `!x` (a tag)
        value = text
    kind = _schema_type(key)
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if not text and kind is not None and not optional:
        # `run_dir=` would otherwise be '' (the current directory) or an empty include list
        raise ConfigError(f"{key}: no value after '='")
    if kind is str and not isinstance(value, str) and not (optional and value is None):
        return text  # run_dir=yes is the directory 'yes', not 'True'
    if typing.get_origin(kind) is list and not isinstance(value, list):
        if text.startswith("[") and text.endswith("]"):  # [*.py, *.pyi]: YAML could not read
            return [item.strip() for item in text[1:-1].split(",") if item.strip()]
        return [text]  # data.include=*.py includes *.py
    return value  # anything else: omegaconf checks it against the key's type


def load_config(
    recipe: str | Path | None = None,
    overrides: list[str] = (),
    model_base: ModelConfig | None = None,
) -> RunConfig:
    """Schema <- recipe YAML <- `key=value` overrides, validated. Errors name the key.
    `model_base` replaces the schema's model defaults (`mtp train --init-from`: the
    checkpoint's model, which the recipe and overrides may still change).

    An override's value is read as YAML (`3`, `1e-3`, `true`, `null`, `[a, b]`) unless YAML
    cannot read it or reads something the key's type cannot hold; then it is the text as
    typed. So `run_dir=yes` is the directory 'yes', a list key given one value gets a one-item
    list (`data.include=*.py` is ['*.py']; `[*.py, *.pyi]` is split at its commas), an empty
    value only clears an optional key (`tracking.uri=`), and a value no reading fits
    (`model.d_model=abc`, `model.d_model=[1,2`) is a ConfigError naming the key."""
    try:
        merged: DictConfig = OmegaConf.structured(RunConfig)
        if model_base is not None:
            merged.model = OmegaConf.structured(model_base)
        if recipe is not None:
            with find_recipe(recipe).open() as f:
                merged = OmegaConf.merge(merged, OmegaConf.load(f))
        for override in overrides:
            key, eq, text = override.partition("=")
            if not eq:
                raise ConfigError(f"override {override!r}: expected key=value")
            OmegaConf.update(merged, key, _override_value(key, text), merge=True)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: missing mandatory value")
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    return validate(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, headed by a comment naming the code that wrote it (every
    run's config.yaml and every checkpoint's say which mtp_dist made them)."""
    from .version import version_string

    return f"# written by {version_string()}\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: RunConfig) -> dict[str, Any]:
    """{'model.d_model': 256, ...}: the whole resolved config as MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out
