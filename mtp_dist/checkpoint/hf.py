"""Hugging Face export: the next-token model as a transformers `LlamaForCausalLM` directory.

    config.json, generation_config.json   a Llama config: layers = trunk + head 1
    model.safetensors                     trunk + head 1 + final norm + unembedding, HF names
    tokenizer.json, tokenizer_config.json encodes like ours (mtp_dist/tokenizers/hf.py)
    mtp_heads.safetensors, mtp_heads.json heads 2..n under Llama layer names, and which is which

The name table `_HF` maps each ParamSpec (owner + path) to a Hugging Face name; `to_hf` and
`from_hf` are both built from it (torchtitan's StateDictAdapter pattern). Our attention rotates
in the half-split convention, as transformers' Llama does, so q/k are copied unpermuted (the
logits test in tests/test_interop.py is what shows it). Both RMSNorms compute in float32 with
weight-only scaling; SwiGLU w_gate / w_up / w_down are HF's gate_proj / up_proj / down_proj.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import ParamSpec, parameter_table
from .layout import CheckpointError
from .weights import atomic_dir, read_weights

HEADS_FILE = "mtp_heads.safetensors"
HEADS_INDEX = "mtp_heads.json"

# Path inside one of our Blocks -> path inside a transformers LlamaDecoderLayer.
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
    # Qwen2's q/k/v biases (model.attn_bias)
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
}
_HF = {
    "embed": {"weight": "model.embed_tokens.weight"},
    "unembed": {"norm.weight": "model.norm.weight", "proj.weight": "lm_head.weight"},
    "trunk": {path: "model.layers.{}." + hf for path, hf in _BLOCK.items()},
    # Head 1 is the Llama model's last layer; heads 2..n keep the same layer names under
    # `mtp_heads.{head number}.` in mtp_heads.safetensors.
    "head": {path: "mtp_heads.{}." + hf for path, hf in _BLOCK.items()},
}


def hf_name(spec: ParamSpec, cfg: ModelConfig) -> str:
    """The Hugging Face name of one parameter (heads 2..n: their name in mtp_heads)."""
    pattern = _HF[spec.owner.kind][spec.path]
    if spec.owner.kind == "trunk":
        return pattern.format(spec.owner.index)
    if spec.owner.kind == "head":
        if spec.owner.index == 0:
            return _HF["trunk"][spec.path].format(cfg.trunk_layers)
        return pattern.format(spec.owner.index + 1)
    return pattern


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical state dict -> Hugging Face names (head 1 in the Llama model, heads 2..n as
    `mtp_heads.{i}.*`)."""
    return {hf_name(spec, cfg): state[name] for name, spec in parameter_table(cfg).items()}


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf` (names must be exactly the model's)."""
    names = {hf_name(spec, cfg): name for name, spec in parameter_table(cfg).items()}
    unknown = sorted(set(hf_state) - set(names))
    missing = sorted(set(names) - set(hf_state))
    if unknown or missing:
        raise CheckpointError(
            f"Hugging Face weights do not match the model: missing {missing[:3]} "
            f"({len(missing)}), unexpected {unknown[:3]} ({len(unknown)})"
        )
    return {names[k]: v for k, v in hf_state.items()}


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' rope_parameters (5.x; 4.x's rope_scaling holds the same keys) of the model."""
    params: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.type == "llama3":
        r = cfg.rope_scaling
        params.update(
            rope_type="llama3",
            factor=r.factor,
            low_freq_factor=r.low_freq_factor,
            high_freq_factor=r.high_freq_factor,
            original_max_position_embeddings=r.original_max_position_embeddings,
        )
    return params


def decoder_config(cfg: ModelConfig, tokenizer, rope: dict) -> dict:
    """The config.json keys every Llama-family layout we write shares (Llama, Qwen2, GLM-4.5):
    shapes, norm, rotary embedding (`rope`: rope_parameters), special tokens and dtype."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_width,
        "num_hidden_layers": cfg.trunk_layers + 1,
        "num_attention_heads": cfg.n_attn_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta / rope_scaling: both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def hf_config(cfg: ModelConfig, tokenizer) -> dict:
    """config.json of the next-token model. vocab_size is the model's embedding size (ours:
    padded); the tokenizer's ids are its first tokenizer.vocab_size rows.

    A model with q/k/v biases (imported from Qwen2) goes out as `Qwen2ForCausalLM`, the only
    one of the two whose biases are q/k/v alone (Llama's `attention_bias` also biases o)."""
    arch, model_type = (
        ("Qwen2ForCausalLM", "qwen2") if cfg.attn_bias else ("LlamaForCausalLM", "llama")
    )
    out = {
        "architectures": [arch],
        "model_type": model_type,
        **decoder_config(cfg, tokenizer, rope_parameters(cfg)),
    }
    if cfg.attn_bias:  # Qwen2: no sliding window anywhere
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _heads_index(cfg: ModelConfig) -> dict:
    table = parameter_table(cfg)
    heads = []
    for i in range(1, cfg.n_future):
        specs = [s for s in table.values() if s.owner.kind == "head" and s.owner.index == i]
        tensors = {hf_name(s, cfg): s.name for s in specs}
        heads.append({"head": i + 1, "predicts": f"token t+{i + 1}", "tensors": tensors})
    return {
        "format": "mtp_dist.mtp_heads/1",
        "n_future": cfg.n_future,
        "next_token_head": f"model.layers.{cfg.trunk_layers} (head 1, predicts token t+1)",
        "shared": "model.norm.weight and lm_head.weight: every head's final norm + unembedding",
        "file": HEADS_FILE,
        "heads": heads,
    }


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head widths vLLM 0.32's CPU attention backend takes (its
`CPUAttentionBackend.get_supported_head_sizes`); a model of another width does not load there."""


def engine_notes(cfg: ModelConfig) -> list[str]:
    """What a serving engine will not take of this model's export, one line each: said at
    export time, since the export itself is still right (transformers loads it)."""
    notes = []
    if cfg.attn_head_dim not in VLLM_CPU_HEAD_SIZES:
        notes.append(
            f"attention head width {cfg.attn_head_dim} is not one vLLM's CPU build takes "
            f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}): transformers loads this export, "
            "vLLM on a CPU will refuse it"
        )
    return notes


def export_hf(source: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face directory of a single-process checkpoint; returns `out`. A
    chained model (model.mtp_arch=chained) goes out in GLM-4.5's layout (glm.py)."""
    from safetensors.torch import save_file

    from ..tokenizers.hf import save_hf_tokenizer

    weights = read_weights(source)
    cfg = weights.cfg.model
    tok = weights.tokenizer
    with atomic_dir(out) as tmp:
        if cfg.chained:
            from .glm import write_glm

            write_glm(weights, tmp, rope_parameters(cfg))
        else:
            hf = {k: v.float().contiguous() for k, v in to_hf(weights.state, cfg).items()}
            heads = {k: hf.pop(k) for k in [k for k in hf if k.startswith("mtp_heads.")]}
            save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if heads:
                save_file(heads, str(tmp / HEADS_FILE), metadata={"format": "pt"})
                (tmp / HEADS_INDEX).write_text(json.dumps(_heads_index(cfg), indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=2) + "\n")
        generation = {
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id,
            # The padded embedding rows are no tokens: never generate them (as our Decoder).
            "suppress_tokens": list(range(tok.vocab_size, cfg.vocab_size)),
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_hf_tokenizer(tok, tmp)
    return Path(out)
