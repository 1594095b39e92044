"""Meta's layout of its released multi-token-prediction models (facebook/multi-token-prediction,
e.g. 7B_1T_4), both ways: `export_meta` (checkpoint -> directory) and `import_meta` (directory ->
a run directory with one complete checkpoint).

    params.json           dim, n_layers (trunk + n heads), n_heads, n_kv_heads, vocab_size,
                          multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, n_future_tokens
    consolidated.00.pth   tok_embeddings, layers.{0..trunk} (the trunk, then head 1),
                          extra_heads.{0..n-2} (heads 2..n), norm, output
    tokenizer.model       the sentencepiece model (a byte-tokenizer model: our tokenizer/ dir)

The name table `_META` maps each ParamSpec (owner + path) to Meta's name. Rotary: Meta rotates
interleaved pairs (x[2j], x[2j+1]), we (like transformers) the half-split pairs (x[j],
x[j + hd/2]); a q/k weight's output rows are reordered per head, with transformers'
convert_llama_weights_to_hf.py permutation on import and its inverse on export. The FFN width
follows Meta's rule from multiple_of / ffn_dim_multiplier (see `meta_ffn_hidden`).

Memory: both directions memory-map the source (torch.load(mmap=True)) and convert tensor by
tensor; only the permuted q/k weights (and dtype casts) are new tensors, the rest are written
from the page cache (docs/interop.md).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig, RunConfig
from ..model import ParamSpec, parameter_table
from .layout import CheckpointError, load_file, padded_vocab, publish, staging_dir, write_common
from .weights import atomic_dir, read_weights

PARAMS = "params.json"
WEIGHTS = "consolidated.00.pth"
SPM_MODEL = "tokenizer.model"
DEFAULT_MAX_SEQ_LEN = 4096  # Llama-2's context, which Meta's 7B models were trained at

# Path inside one of our Blocks -> Meta's TransformerBlock.
_BLOCK = {
    "attn_norm.weight": "attention_norm.weight",
    "attn.wq.weight": "attention.wq.weight",
    "attn.wk.weight": "attention.wk.weight",
    "attn.wv.weight": "attention.wv.weight",
    "attn.wo.weight": "attention.wo.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w_gate.weight": "feed_forward.w1.weight",
    "mlp.w_down.weight": "feed_forward.w2.weight",
    "mlp.w_up.weight": "feed_forward.w3.weight",
}
_META = {
    "embed": {"weight": "tok_embeddings.weight"},
    "unembed": {"norm.weight": "norm.weight", "proj.weight": "output.weight"},
    "trunk": {path: "layers.{}." + meta for path, meta in _BLOCK.items()},
    "head": {path: "extra_heads.{}." + meta for path, meta in _BLOCK.items()},
}
_ROTATED = ("attn.wq.weight", "attn.wk.weight")


def meta_name(spec: ParamSpec, cfg: ModelConfig) -> str:
    pattern = _META[spec.owner.kind][spec.path]
    if spec.owner.kind == "trunk":
        return pattern.format(spec.owner.index)
    if spec.owner.kind == "head":  # head 1 is the last entry of `layers`
        if spec.owner.index == 0:
            return _META["trunk"][spec.path].format(cfg.trunk_layers)
        return pattern.format(spec.owner.index - 1)
    return pattern


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A q/k weight's rows from Meta's interleaved rotary order to the half-split one
    (transformers' convert_llama_weights_to_hf.py `permute`)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(w.shape)


def meta_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width rule (llama/model.py)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, width: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's rule gives `width`: a plain rounding
    multiple where one fits (the largest, as Meta's own params.json use 256), else a multiplier."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_hidden(dim, multiple_of, None) == width:
            return multiple_of, None
    base = int(2 * 4 * dim / 3)
    for multiplier in (width / base, math.nextafter(width / base, math.inf)):
        if meta_ffn_hidden(dim, 1, multiplier) == width:
            return 1, multiplier
    raise CheckpointError(
        f"no multiple_of / ffn_dim_multiplier of Meta's rule gives FFN width {width} at dim {dim}"
    )


def meta_params(cfg: ModelConfig) -> dict:
    multiple_of, multiplier = ffn_params(cfg.d_model, cfg.ffn_width)
    return {
        "dim": cfg.d_model,
        "n_layers": cfg.trunk_layers + cfg.n_future,  # every block: `layers` + `extra_heads`
        "n_heads": cfg.n_attn_heads,
        "n_kv_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "n_future_tokens": cfg.n_future,
    }


def _rotated_heads(path: str, cfg: ModelConfig) -> int:
    """Heads of a rotated projection: the query heads for wq, the key/value heads for wk."""
    return cfg.kv_heads if path == "attn.wk.weight" else cfg.n_attn_heads


def export_meta(source: str | Path, out: str | Path) -> Path:
    """Write Meta's layout of a single-process checkpoint; returns `out`."""
    weights = read_weights(source)
    cfg = weights.cfg.model
    params = meta_params(cfg)
    state = {}
    for name, spec in parameter_table(cfg).items():
        tensor = weights.state[name]
        if spec.path in _ROTATED:
            tensor = half_to_interleaved(tensor, _rotated_heads(spec.path, cfg))
        state[meta_name(spec, cfg)] = tensor
    with atomic_dir(out) as tmp:
        torch.save(state, tmp / WEIGHTS)
        (tmp / PARAMS).write_text(json.dumps(params, indent=2) + "\n")
        if weights.tokenizer.kind == "sentencepiece":
            shutil.copy(weights.path / "tokenizer" / SPM_MODEL, tmp / SPM_MODEL)
        else:  # not a format of Meta's: our own tokenizer directory, which import_meta reads
            shutil.copytree(weights.path / "tokenizer", tmp / "tokenizer")
    return Path(out)


def _read_tokenizer(directory: Path):
    from ..tokenizers import SentencePieceTokenizer, load_tokenizer

    if (directory / SPM_MODEL).is_file():
        return SentencePieceTokenizer(directory / SPM_MODEL)
    if (directory / "tokenizer").is_dir():
        return load_tokenizer(directory / "tokenizer")
    raise CheckpointError(f"{directory}: no {SPM_MODEL} (nor an mtp_dist tokenizer/ directory)")


def model_config(params: dict, tokenizer, max_seq_len: int, where: Path) -> ModelConfig:
    """Our ModelConfig of a params.json (CheckpointError for what we cannot represent)."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        # n_layers counts every block: `layers` (trunk + head 1), then n_future - 1 extra heads.
        n_future = int(params.get("n_future_tokens", 1))
        trunk = int(params["n_layers"]) - n_future
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: missing or bad key {err}") from None
    if trunk < 0 or n_future < 1:
        raise CheckpointError(
            f"{where}: n_layers={trunk + n_future} cannot hold n_future_tokens={n_future} heads"
        )
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if n_heads % n_kv:
        raise CheckpointError(f"{where}: n_kv_heads={n_kv} does not divide n_heads={n_heads}")
    vocab = int(params.get("vocab_size") or -1)
    if vocab <= 0:  # Llama-2's params.json says -1: the tokenizer's size
        vocab = tokenizer.vocab_size
    if vocab != padded_vocab(tokenizer.vocab_size):  # the rule check_tokenizer applies
        raise CheckpointError(
            f"{where}: vocab_size={vocab}, but the tokenizer has {tokenizer.vocab_size} pieces "
            f"(the model needs {padded_vocab(tokenizer.vocab_size)} rows: one per piece, "
            "rounded up to a multiple of 64)"
        )
    multiple_of, multiplier = int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
    ffn = meta_ffn_hidden(dim, multiple_of, multiplier)
    return ModelConfig(
        vocab_size=vocab,
        d_model=dim,
        n_layers=trunk + n_future,
        n_attn_heads=n_heads,
        n_kv_heads=0 if n_kv == n_heads else n_kv,
        ffn_hidden=ffn,
        n_future=n_future,
        parameter_matched=True,
        max_seq_len=max_seq_len,
        rope_theta=float(params.get("rope_theta", 10000.0)),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        pad_id=tokenizer.pad_id,
    )


def import_meta(source: str | Path, run_dir: str | Path, max_seq_len: int | None = None) -> Path:
    """A run directory holding one complete checkpoint (step 0) of Meta's directory `source`;
    returns the checkpoint directory."""
    source, run_dir = Path(source), Path(run_dir)
    if not (source / PARAMS).is_file():
        raise CheckpointError(f"{source}: no {PARAMS}; not a Meta model directory")
    if (run_dir / "checkpoints").exists():
        raise CheckpointError(f"{run_dir} already holds checkpoints/; choose a new run directory")
    tokenizer = _read_tokenizer(source)
    try:
        params = json.loads((source / PARAMS).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source / PARAMS}: not JSON ({err})") from None
    model = model_config(params, tokenizer, max_seq_len or DEFAULT_MAX_SEQ_LEN, source / PARAMS)
    meta = load_file(source / WEIGHTS, map_location="cpu", mmap=True, weights_only=True)
    extra = sorted({k.split(".")[1] for k in meta if k.startswith("extra_heads.")}, key=int)
    if len(extra) != model.n_future - 1:
        raise CheckpointError(
            f"{source}: n_future_tokens={model.n_future} in {PARAMS}, but {WEIGHTS} holds "
            f"{len(extra)} extra_heads (it should hold n_future_tokens - 1)"
        )
    table = parameter_table(model)
    names = {meta_name(spec, model): name for name, spec in table.items()}
    missing, unexpected = sorted(set(names) - set(meta)), sorted(set(meta) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{source / WEIGHTS} does not match {PARAMS}: missing {missing[:3]} "
            f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    state = {}
    for meta_key, name in names.items():
        tensor = meta[meta_key]
        if tuple(tensor.shape) != table[name].shape:
            raise CheckpointError(
                f"{source / WEIGHTS}: {meta_key} has shape {tuple(tensor.shape)}, {PARAMS} "
                f"makes it {table[name].shape}"
            )
        if table[name].path in _ROTATED:
            tensor = interleaved_to_half(tensor, _rotated_heads(table[name].path, model))
        state[name] = tensor
    cfg = RunConfig(
        run_dir=str(run_dir),
        model=model,
        data=DataConfig(tokenizer="sentencepiece" if tokenizer.kind != "bytes" else "bytes"),
    )
    cfg.data.seq_len = min(cfg.data.seq_len, max_seq_len or DEFAULT_MAX_SEQ_LEN)
    tmp = staging_dir(run_dir, 0)
    torch.save(state, tmp / "model.pt")
    write_common(tmp, cfg, tokenizer, {"step": 0, "imported_from": str(source)})
    return publish(tmp, 0, keep_last=1, meta={"imported_from": str(source), "format": "meta"})
