"""`mtp import hf DIR --out RUN_DIR`: a pretrained Hugging Face checkpoint of the Llama family as
a run directory whose model gains n - 1 multi-token heads (docs/interop.md, "Coming in from
Hugging Face").

    DIR/config.json                          LlamaForCausalLM, MistralForCausalLM (no sliding
                                             window shorter than the context), Qwen2ForCausalLM
    DIR/model.safetensors                    or shards + model.safetensors.index.json
    DIR/tokenizer.json, tokenizer_config.json  the checkpoint's own tokenizer (kind "hf")

The imported layers are the trunk plus head 1, in Meta's layout: the last layer is head 1, so the
next-token model is exactly the checkpoint's. Heads 2..n are new: copies of that last layer
(`--head-init copy`, the default) or freshly initialised layers (`random`). The names come from
the one Hugging Face name table (hf.py), so export and import cannot disagree.

    DIR/config.json                          Glm4MoeForCausalLM whose MoE layers are exactly
                                             dense, with num_nextn_predict_layers MTP layers

comes in as a chained model (model.mtp_arch=chained) with those layers as its modules: the
layout `mtp export hf` writes for one (glm.py, which holds its name table). A real mixture of
experts (a routed expert that is not zero) is refused.

Everything that can be checked is checked before anything is written (config fields, the
tokenizer against the embedding, every shard present, every tensor's name and shape, read from
the safetensors headers without loading data); a failure leaves no run directory. Tensors are
then read one at a time from the memory-mapped files, in the checkpoint's dtype, into the one
state dict that is saved: the import holds one copy of the model (plus the new heads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import ConfigError, DataConfig, ModelConfig, RopeScalingConfig, RunConfig, validate
from . import glm
from .glm import ARCH as GLM_ARCH
from .hf import hf_name
from .layout import CheckpointError, publish, staging_dir, write_common

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HEAD_INIT = ("copy", "random")
# architecture -> whether its q/k/v projections carry biases
ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}
# Tensors a checkpoint may hold that are no parameter (old transformers saved rotary buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _field(config: dict, key: str, where: Path, kind=int):
    if key not in config or config[key] is None:
        raise CheckpointError(f"{where}: {key} is missing")
    try:
        return kind(config[key])
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: {key}={config[key]!r} is not a {kind.__name__}") from None


def _rope(config: dict, where: Path) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from transformers 5's rope_parameters or 4.x's rope_theta +
    rope_scaling; rope types other than the plain one and llama3 are refused by name."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    source, key = (params, "rope_parameters")
    if "rope_type" not in params:
        source, key = (scaling, "rope_scaling")
    kind = source.get("rope_type", source.get("type", "default"))
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind != "llama3":
        raise CheckpointError(
            f"{where}: {key}.rope_type={kind!r} is not supported (only the plain rotary "
            "embedding and 'llama3')"
        )
    try:
        return theta, RopeScalingConfig(
            type="llama3",
            factor=float(source["factor"]),
            low_freq_factor=float(source["low_freq_factor"]),
            high_freq_factor=float(source["high_freq_factor"]),
            original_max_position_embeddings=int(source["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise CheckpointError(f"{where}: {key} of type llama3 lacks {err.args[0]}") from None


def _sliding_window(config: dict, arch: str) -> int | None:
    """The attention window the model uses, None for full attention."""
    if arch == "MistralForCausalLM":
        return config.get("sliding_window")
    if arch == "Qwen2ForCausalLM":
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") or "sliding_attention" in layer_types:
            return config.get("sliding_window")
    return None


def _architecture(config: dict, where: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES and arch != GLM_ARCH:
        raise CheckpointError(
            f"{where}: architectures={archs!r} is not supported (supported: "
            f"{', '.join([*ARCHITECTURES, GLM_ARCH])})"
        )
    return arch


def _common_fields(config: dict, where: Path, max_seq_len: int | None, pad_id: int) -> dict:
    """The ModelConfig fields every supported architecture states alike."""
    arch = _architecture(config, where)
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={config['hidden_act']!r} (only silu)")
    # Llama's attention_bias also biases o_proj; GLM's biases q/k/v only (glm.py).
    for key in ("mlp_bias",) if arch == GLM_ARCH else ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported")
    d = _field(config, "hidden_size", where)
    n_heads = _field(config, "num_attention_heads", where)
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or d // n_heads)
    context = _field(config, "max_position_embeddings", where)
    max_seq_len = max_seq_len or context
    window = _sliding_window(config, arch)
    if window is not None and window < max_seq_len:
        raise CheckpointError(
            f"{where}: sliding_window={window} is shorter than the context ({max_seq_len}); "
            f"windowed attention is not supported: import with --max-seq-len {window} or less"
        )
    if n_kv < 1 or n_heads % n_kv:
        raise CheckpointError(
            f"{where}: num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}"
        )
    theta, scaling = _rope(config, where)
    return dict(
        vocab_size=_field(config, "vocab_size", where),
        d_model=d,
        # The checkpoint's layers are the trunk and head 1 (the chained family's depth 0).
        n_layers=_field(config, "num_hidden_layers", where),
        parameter_matched=False,
        n_attn_heads=n_heads,
        n_kv_heads=0 if n_kv == n_heads else n_kv,
        head_dim=0 if head_dim * n_heads == d else head_dim,
        ffn_hidden=_field(config, "intermediate_size", where),
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        init_std=float(config.get("initializer_range", 0.02)),
        pad_id=pad_id,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def model_config(
    config: dict, where: Path, n_future: int, max_seq_len: int | None, pad_id: int
) -> ModelConfig:
    """Our ModelConfig of a Llama-family transformers config.json (CheckpointError, naming the
    field, for what the model cannot represent). The n - 1 new heads come on top of the
    checkpoint's layers."""
    common = _common_fields(config, where, max_seq_len, pad_id)
    arch = _architecture(config, where)
    cfg = ModelConfig(**common, n_future=n_future, attn_bias=ARCHITECTURES[arch])
    try:
        validate(RunConfig(run_dir=".", model=cfg, data=DataConfig(seq_len=1)))
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None
    return cfg


def _shards(source: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (every file checked to exist)."""
    if (source / INDEX).is_file():
        try:
            weight_map = json.loads((source / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{source / INDEX}: not a safetensors index ({err})") from None
        files = {name: source / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"{source / INDEX} names {path.name}, which is missing")
        return files
    if (source / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(source / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), source / SINGLE)
    raise CheckpointError(
        f"{source}: neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read)"
    )


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF name -> canonical name of every imported parameter (not the new heads 2..n)."""
    from ..model import parameter_table

    return {
        hf_name(spec, cfg): name
        for name, spec in parameter_table(cfg).items()
        if not (spec.owner.kind == "head" and spec.owner.index > 0)
    }


def _by_file(files: dict[str, Path], names) -> dict[Path, list[str]]:
    """`names` grouped by the safetensors file holding them (each file opened once)."""
    grouped: dict[Path, list[str]] = {}
    for hf in names:
        grouped.setdefault(files[hf], []).append(hf)
    return grouped


def _check_tensors(
    files: dict[str, Path],
    cfg: ModelConfig,
    source: Path,
    wanted: dict[str, str],
    extra: dict[str, tuple[int, ...]],
) -> None:
    """The checkpoint holds exactly the model's tensors (`wanted`: HF name -> canonical name)
    and the `extra` ones that are no parameter of ours, with their shapes (headers only)."""
    from safetensors import safe_open

    from ..model import parameter_table

    table = parameter_table(cfg)
    shapes = {**{hf: table[name].shape for hf, name in wanted.items()}, **extra}
    present = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:  # some tied checkpoints also store the (identical) lm_head
        present.discard("lm_head.weight")
    missing, unexpected = sorted(set(shapes) - present), sorted(present - set(shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the tensors do not match config.json: missing {missing[:3]} "
            f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    for path, names in _by_file(files, shapes).items():
        with safe_open(path, framework="pt") as f:
            for hf in names:
                shape = tuple(f.get_slice(hf).get_shape())
                if shape != shapes[hf]:
                    raise CheckpointError(
                        f"{path.name}: {hf} has shape {shape}, config.json makes it {shapes[hf]}"
                    )


def _read_state(files: dict[str, Path], wanted: dict[str, str]) -> dict:
    """canonical name -> tensor, read one tensor at a time, file by file."""
    from safetensors import safe_open

    state = {}
    for path, names in _by_file(files, wanted).items():
        with safe_open(path, framework="pt") as f:
            for hf in names:
                state[wanted[hf]] = f.get_tensor(hf)
    return state


def add_heads(state: dict, cfg: ModelConfig, head_init: str, seed: int) -> None:
    """Heads 2..n (0-based 1..n-1) into `state`: copies of head 1 (the checkpoint's last layer)
    or freshly initialised layers (the model's own initialisation: normal(0, init_std)
    matrices, unit norm gains, zero biases), in head 1's dtype."""
    import torch

    from ..model import Owner, canonical_name
    from ..model.layers import LocalLayers
    from ..model.transformer import make_block

    paths = _block_paths(cfg)
    for i in range(1, cfg.n_future):
        if head_init == "copy":
            for path in paths:
                head1 = state[canonical_name(Owner("head", 0), path)]
                state[canonical_name(Owner("head", i), path)] = head1.clone()
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            block = make_block(cfg, LocalLayers(cfg.init_std))
        dtype = state[canonical_name(Owner("head", 0), "attn.wq.weight")].dtype
        for path, param in block.named_parameters():
            state[canonical_name(Owner("head", i), path)] = param.detach().to(dtype)


def _block_paths(cfg: ModelConfig) -> list[str]:
    from ..model import parameter_table

    table = parameter_table(cfg).values()
    return [s.path for s in table if s.owner.kind == "head" and s.owner.index == 0]


def import_hf(
    source: str | Path,
    run_dir: str | Path,
    *,
    n_future: int | None = None,
    head_init: str | None = None,
    max_seq_len: int | None = None,
    seed: int = 0,
) -> Path:
    """A run directory holding one complete checkpoint (step 0) of the Hugging Face model in
    `source`; returns the checkpoint directory. A Llama-family model gains heads up to
    `n_future` (default 4), made by `head_init` (default copy); a GLM-4.5 one (glm.py) is a
    chained model that brings its own modules."""
    source, run_dir = Path(source), Path(run_dir)
    if n_future is not None and n_future < 1:
        raise CheckpointError(f"--n-future must be >= 1 (got {n_future})")
    if head_init is not None and head_init not in HEAD_INIT:
        raise CheckpointError(f"--head-init must be one of {', '.join(HEAD_INIT)}")
    if run_dir.exists():
        raise CheckpointError(f"{run_dir} already exists; choose a new run directory")
    if not (source / CONFIG).is_file():
        raise CheckpointError(f"{source}: no {CONFIG}; not a transformers model directory")
    try:
        config = json.loads((source / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source / CONFIG}: not JSON ({err})") from None
    tokenizer = _read_tokenizer(source)
    where = source / CONFIG
    chained = _architecture(config, where) == GLM_ARCH
    if chained:
        common = _common_fields(config, where, max_seq_len, tokenizer.pad_id)
        model, moe = glm.model_config(config, where, common)
        _check_glm_options(model, n_future, head_init, where)
        wanted, extra = glm.glm_names(model, moe), glm.zero_experts(model, moe)
    else:
        n_future = 4 if n_future is None else n_future
        model = model_config(config, where, n_future, max_seq_len, tokenizer.pad_id)
        wanted, extra = _hf_names(model), {}
    if tokenizer.vocab_size > model.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
            f"embedding's {model.vocab_size} rows (config.json vocab_size)"
        )
    files = _shards(source)
    _check_tensors(files, model, source, wanted, extra)
    if chained:
        glm.check_dense(files, model, moe, source)
    cfg = RunConfig(run_dir=str(run_dir), model=model, data=DataConfig(tokenizer="hf"))
    cfg.data.seq_len = min(cfg.data.seq_len, model.max_seq_len)
    origin = {"imported_from": str(source), "format": "hf"}
    if not chained:
        origin["head_init"] = head_init = head_init or "copy"
    try:
        state = _read_state(files, wanted)
        if not chained:
            add_heads(state, model, head_init, seed)
        return _write(state, cfg, tokenizer, origin)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _check_glm_options(model: ModelConfig, n_future, head_init, where: Path) -> None:
    """A GLM-4.5 checkpoint's modules are its own: --n-future may only restate their number."""
    if n_future is not None and n_future != model.n_future:
        raise CheckpointError(
            f"{where}: a chained model with {model.n_future - 1} MTP layers "
            f"(num_nextn_predict_layers) has n = {model.n_future}, not --n-future {n_future}"
        )
    if head_init is not None:
        raise CheckpointError(
            f"{where}: --head-init makes new heads; a chained model brings its own modules"
        )


def _read_tokenizer(source: Path):
    from ..tokenizers.pretrained import PretrainedTokenizer

    return PretrainedTokenizer.from_model_dir(source)


def _write(state: dict, cfg: RunConfig, tokenizer, origin: dict) -> Path:
    import torch

    tmp = staging_dir(cfg.run_dir, 0)
    torch.save(state, tmp / "model.pt")
    write_common(tmp, cfg, tokenizer, {"step": 0, **origin})
    return publish(tmp, 0, keep_last=1, meta=origin)
