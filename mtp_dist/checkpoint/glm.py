"""The GLM-4.5 layout of a chained model (transformers' and vLLM's `Glm4MoeForCausalLM`): what
`mtp export hf` writes for model.mtp_arch=chained and what `mtp import hf` reads back
(docs/interop.md, "Chained models: the GLM-4.5 layout").

    config.json              Glm4MoeForCausalLM; num_hidden_layers = trunk + 1 (depth 0),
                             num_nextn_predict_layers = n - 1
    model.safetensors        every tensor, the MTP layers included (save_pretrained drops them)
    modeling_glm4_moe_mtp.py transformers' Glm4MoeForCausalLM told where its MTP layers are
    tokenizer.json, ...      as the Llama export (mtp_dist/tokenizers/hf.py)

    ours                              GLM
    trunk layer k                     model.layers.{k}.*            a dense layer
    depth 0 (heads.head0__*)          model.layers.{trunk}.*        an exactly dense MoE layer
    final norm / U                    model.norm.weight / lm_head.weight
    module k (heads.head{k}__*)       model.layers.{trunk + k}.*: enorm, hnorm, eh_proj,
                                      shared_head.norm (our norm), the block as an MoE layer

GLM has no dense-only form: vLLM refuses a model without an MoE layer and transformers builds
every MTP layer's MLP as one. Depth 0 and the modules are therefore MoE layers that compute
exactly the dense MLP: the MLP is the shared expert (`n_shared_experts * moe_intermediate_size`
= the MLP width), beside two routed experts whose weights are all zero (two: the router sums
each group's top-2 scores), a zero router and correction bias, one expert per token. A routed
expert adds 0 * weight, so the layer's output is the shared expert's, bit for bit. The trunk's
layers stay plain MLPs (`first_k_dense_replace` = trunk layers).

The rest is Llama's: half-split rotary (`rotate_half`) over the whole head with
`partial_rotary_factor` 1.0 (GLM's default is 0.5), RMSNorm computed in float32, SwiGLU,
q/k/v biases only (`attention_bias`), no q/k norm.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, DataConfig, ModelConfig, RunConfig, validate
from ..model import ParamSpec, parameter_table
from .hf import decoder_config
from .layout import CheckpointError

ARCH = "Glm4MoeForCausalLM"
N_ROUTED = 2
MODELING_FILE = "modeling_glm4_moe_mtp.py"
MTP_CLASS = "Glm4MoeMtpForCausalLM"

_ATTENTION = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
}
_MLP = {"mlp.w_gate.weight": "gate_proj.weight", "mlp.w_up.weight": "up_proj.weight"}
_MLP["mlp.w_down.weight"] = "down_proj.weight"
_DENSE = {**_ATTENTION, **{p: "mlp." + hf for p, hf in _MLP.items()}}
_MOE = {**_ATTENTION, **{p: "mlp.shared_experts." + hf for p, hf in _MLP.items()}}
_MODULE = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
    **{"block." + p: hf for p, hf in _MOE.items()},
}
_SHARED = {"norm.weight": "model.norm.weight", "proj.weight": "lm_head.weight"}


@dataclass(frozen=True)
class MoeShape:
    """How a checkpoint's MoE layers are laid out: layers `first_moe` on are MoE layers (those
    before are plain MLPs), each with a shared expert `width * n_shared` wide and `n_routed`
    routed experts `width` wide."""

    first_moe: int
    width: int
    n_shared: int
    n_routed: int = N_ROUTED

    @classmethod
    def of(cls, cfg: ModelConfig) -> MoeShape:
        """The export's: the trunk dense, the MLP as the shared expert. The zero experts are
        `width` wide, so it is kept small: the largest power of two up to 64 dividing the MLP
        width (vLLM's CPU MoE kernel, grouped_mm, wants rows a multiple of 16 bytes)."""
        width = math.gcd(cfg.ffn_width, 64)
        return cls(cfg.trunk_layers, width, cfg.ffn_width // width)


def glm_name(spec: ParamSpec, cfg: ModelConfig, moe: MoeShape) -> str:
    """The GLM-4.5 name of one parameter of a chained model."""
    kind, index = spec.owner.kind, spec.owner.index
    if kind == "embed":
        return "model.embed_tokens.weight"
    if kind == "unembed":
        return _SHARED[spec.path]
    layer = index if kind == "trunk" else cfg.trunk_layers + index
    if kind == "head" and index > 0:
        return f"model.layers.{layer}.{_MODULE[spec.path]}"
    table = _MOE if layer >= moe.first_moe else _DENSE
    return f"model.layers.{layer}.{table[spec.path]}"


def glm_names(cfg: ModelConfig, moe: MoeShape) -> dict[str, str]:
    """GLM name -> canonical name of every parameter."""
    return {glm_name(spec, cfg, moe): name for name, spec in parameter_table(cfg).items()}


def zero_experts(cfg: ModelConfig, moe: MoeShape) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors that make each MoE layer exactly dense (all zero)."""
    d, width = cfg.d_model, moe.width
    out = {}
    for layer in range(moe.first_moe, cfg.trunk_layers + cfg.n_future):
        mlp = f"model.layers.{layer}.mlp."
        out[mlp + "gate.weight"] = (moe.n_routed, d)
        out[mlp + "gate.e_score_correction_bias"] = (moe.n_routed,)
        for e in range(moe.n_routed):
            out[f"{mlp}experts.{e}.gate_proj.weight"] = (width, d)
            out[f"{mlp}experts.{e}.up_proj.weight"] = (width, d)
            out[f"{mlp}experts.{e}.down_proj.weight"] = (d, width)
    return out


def check_exportable(cfg: ModelConfig, source) -> None:
    """Refuse, in one line naming the engine, what the GLM layout's readers cannot take."""
    if cfg.ffn_width % 4:
        raise CheckpointError(
            f"{source}: the MLP width {cfg.ffn_width} is not a multiple of 4: vLLM's CPU MoE "
            "kernel cannot take it as GLM-4.5's shared expert"
        )


def glm_config(cfg: ModelConfig, tokenizer, rope: dict) -> dict:
    """config.json of a chained model in the GLM-4.5 layout (`rope`: hf.rope_parameters)."""
    moe = MoeShape.of(cfg)
    # transformers 5 reads the rotary fraction from rope_parameters, vLLM and transformers 4
    # from the top level; GLM's default there is 0.5.
    rope = {**rope, "partial_rotary_factor": 1.0}
    return {
        "architectures": [ARCH],
        "model_type": "glm4_moe",
        # transformers' own class finds the MTP layers only at GLM-4.5's depths; with
        # trust_remote_code=True AutoModelForCausalLM takes this file's subclass instead.
        "auto_map": {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MTP_CLASS}"},
        **decoder_config(cfg, tokenizer, rope),
        "num_nextn_predict_layers": cfg.n_future - 1,
        "partial_rotary_factor": 1.0,
        "attention_bias": cfg.attn_bias,
        "use_qk_norm": False,
        "first_k_dense_replace": moe.first_moe,
        "moe_intermediate_size": moe.width,
        "n_shared_experts": moe.n_shared,
        "n_routed_experts": moe.n_routed,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    }


def write_glm(weights, tmp: Path, rope: dict) -> None:
    """Write model.safetensors, config.json and the modeling file of a chained checkpoint
    (`weights`: a CheckpointWeights) into `tmp`."""
    from safetensors.torch import save_file

    cfg = weights.cfg.model
    check_exportable(cfg, weights.path)
    moe = MoeShape.of(cfg)
    names = glm_names(cfg, moe)
    tensors = {hf: weights.state[name].float().contiguous() for hf, name in names.items()}
    if cfg.tie_embeddings:  # vLLM's Glm4MoeForCausalLM reads lm_head.weight whether tied or not
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    for name, shape in zero_experts(cfg, moe).items():
        tensors[name] = torch.zeros(shape)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = glm_config(cfg, weights.tokenizer, rope)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)


# -- coming in ------------------------------------------------------------------------------
def model_config(config: dict, where: Path, common: dict) -> tuple[ModelConfig, MoeShape]:
    """Our chained ModelConfig of a GLM-4.5 config.json, and how its MoE layers are laid out;
    `common`: the ModelConfig fields the Llama family's reader takes from it
    (hf_import.model_config). What our model cannot be (a rotary fraction under 1, q/k norms,
    a shared expert that is not the MLP) is refused by name; whether the routed experts are
    zero is checked on the tensors (`check_dense`)."""
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    if float(partial) != 1.0:
        raise CheckpointError(
            f"{where}: partial_rotary_factor={partial}: only a rotary embedding over the whole "
            "head (1.0) is supported"
        )
    if config.get("use_qk_norm"):
        raise CheckpointError(f"{where}: use_qk_norm=true is not supported")
    moe = MoeShape(
        first_moe=int(config.get("first_k_dense_replace", 1)),
        width=int(config.get("moe_intermediate_size") or 0),
        n_shared=int(config.get("n_shared_experts") or 0),
        n_routed=int(config.get("n_routed_experts") or 0),
    )
    if moe.width * moe.n_shared != common["ffn_hidden"]:
        raise CheckpointError(
            f"{where}: n_shared_experts * moe_intermediate_size = {moe.width * moe.n_shared} "
            f"is not intermediate_size={common['ffn_hidden']}: the shared expert is not the MLP"
        )
    cfg = ModelConfig(
        **common,
        n_future=int(config.get("num_nextn_predict_layers") or 0) + 1,
        mtp_arch="chained",
        attn_bias=bool(config.get("attention_bias", False)),
    )
    try:
        validate(RunConfig(run_dir=".", model=cfg, data=DataConfig(seq_len=1)))
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None
    return cfg, moe


def check_dense(files: dict[str, Path], cfg: ModelConfig, moe: MoeShape, source: Path) -> None:
    """Every MoE layer's routed experts, router and correction bias are zero, so the layer is
    its shared expert: our dense MLP. Read tensor by tensor (a routed expert is one tensor in
    this layout), so a real mixture of experts is refused at its first expert."""
    from safetensors import safe_open

    for name in zero_experts(cfg, moe):
        with safe_open(files[name], framework="pt") as f:
            if torch.count_nonzero(f.get_tensor(name)):
                raise CheckpointError(
                    f"{source}: {name} is not zero: a real mixture of experts, which is not "
                    "supported (only MoE layers that compute exactly the dense MLP)"
                )
