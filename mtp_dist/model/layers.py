"""Llama-style building blocks: RMSNorm, rotary embedding, attention, SwiGLU MLP, the block.

The linear and embedding layers come from an injected `LayerFactory`, the seam through which the
distributed layer swaps in Megatron-core tensor-parallel layers. Nothing here knows of process
groups: attention derives its local head count from the width the factory's layers produce.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LayerFactory(Protocol):
    """Makes the layers whose parallel form differs from the local one."""

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """Linear whose output features (and bias) may be split over ranks (input replicated)."""

    def row(self, in_features: int, out_features: int) -> nn.Module:
        """Linear whose input features may be split over ranks (output summed)."""

    def embedding(self, vocab_size: int, dim: int) -> nn.Module: ...

    def norm(self, dim: int, eps: float) -> nn.Module:
        """RMSNorm over the last dimension (with sequence parallelism: also the point where the
        sequence-sharded residual stream is gathered for the layers that follow)."""

    def replicated(self, in_features: int, out_features: int) -> nn.Module:
        """Linear held whole on every rank (a chained module's small eh_proj): never split."""

    def unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        """Projection to logits; may return a vocab shard of them."""

    def tied_unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        """A parameter-free projection to logits, `(x, weight) -> logits`, by the input
        embedding's matrix (tied embeddings); split over ranks as `embedding` splits it."""

    def token_loss(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token cross-entropy, per-token top-1 correct) for (N, V[shard]) logits, (N,) labels.
        Ignored labels (IGNORE_INDEX) must give loss 0 and correct False."""


class LocalLayers:
    """Single-process layers: plain nn.Linear / nn.Embedding, initialised N(0, std)."""

    def __init__(self, init_std: float = 0.02) -> None:
        self.init_std = init_std

    def _init(self, module: nn.Module) -> nn.Module:
        nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
        return module

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._init(nn.Linear(in_features, out_features, bias=bias))

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return self._init(nn.Linear(in_features, out_features, bias=False))

    def replicated(self, in_features: int, out_features: int) -> nn.Module:
        return self._init(nn.Linear(in_features, out_features, bias=False))

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return self._init(nn.Embedding(vocab_size, dim))

    def norm(self, dim: int, eps: float) -> nn.Module:
        return RMSNorm(dim, eps)

    def unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        return self._init(nn.Linear(dim, vocab_size, bias=False))

    def tied_unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        return TiedProjection()

    def token_loss(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 (or wider) softmax even under bf16 autocast: the loss is what we optimise.
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        correct = (logits.argmax(dim=-1) == labels) & (labels != IGNORE_INDEX)
        return loss, correct


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dimension, in float32 at least (what RMSNorm computes)."""
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.to(dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class TiedProjection(nn.Module):
    """logits = x @ weight.T with the weight handed in: the input embedding's (tied)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Llama 3.1's frequency rescaling (transformers' `_compute_llama3_parameters`, Meta's
    `apply_scaling`): wavelengths longer than original_max / low_freq_factor are stretched by
    `factor`, those shorter than original_max / high_freq_factor kept, and the band between
    interpolated smoothly. `scaling` is a ModelConfig.rope_scaling."""
    old = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(
    head_dim: int, max_len: int, theta: float, scaling=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim // 2); `scaling` a ModelConfig.rope_scaling
    (type 'none' or 'llama3'), or None.

    The inverse frequencies are computed in float32, as transformers and Meta's Llama compute
    them (an imported model's rotations must be its own to the last bit of the frequency), then
    the angles in float64."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is not None and scaling.type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    inv_freq = inv_freq.double()
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd/2) or per-sequence (B, T, hd/2). Half-split convention."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention through scaled_dot_product_attention.

    `kv_cache`, when given, is an object with `update(k, v) -> (k_all, v_all, mask)` (the
    inference engine's); mask None means plain causal attention over the new tokens.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layers: LayerFactory,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        """`head_dim` defaults to d_model / n_heads; `bias`: biases on q, k and v (Qwen2)."""
        super().__init__()
        self.head_dim = head_dim or d_model // n_heads
        q_width = n_heads * self.head_dim
        kv_width = (n_kv_heads or n_heads) * self.head_dim  # grouped-query attention: fewer k/v
        # Separate q/k/v projections so a column split keeps whole heads on each rank (and,
        # with n_kv_heads divisible by the split, each rank's query heads with their k/v heads).
        self.wq = layers.column(d_model, q_width, bias)
        self.wk = layers.column(d_model, kv_width, bias)
        self.wv = layers.column(d_model, kv_width, bias)
        self.wo = layers.row(q_width, d_model)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # (B, T, d_local)
        n_local = q.shape[-1] // self.head_dim  # fewer heads per rank under tensor parallelism
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H or Hkv, T, hd)
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(k, v)
        # Query head h reads key/value head h // (H / Hkv): torch's grouped-query attention.
        gqa = k.shape[1] != n_local
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, n_local * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, layers: LayerFactory) -> None:
        super().__init__()
        self.w_gate = layers.column(d_model, hidden)
        self.w_up = layers.column(d_model, hidden)
        self.w_down = layers.row(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer layer; used for the trunk and for every output head."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn_hidden: int,
        eps: float,
        layers: LayerFactory,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        attn_bias: bool = False,
    ) -> None:
        super().__init__()
        self.attn_norm = layers.norm(d_model, eps)
        self.attn = Attention(d_model, n_heads, layers, n_kv_heads, head_dim, attn_bias)
        self.mlp_norm = layers.norm(d_model, eps)
        self.mlp = SwiGLU(d_model, ffn_hidden, layers)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class Unembedding(nn.Module):
    """The shared final norm + projection to the vocabulary. `tied`: the projection has no
    weight of its own; forward takes the input embedding's matrix as `weight`."""

    def __init__(
        self, d_model: int, vocab_size: int, eps: float, layers: LayerFactory, tied: bool = False
    ) -> None:
        super().__init__()
        self.tied = tied
        self.norm = layers.norm(d_model, eps)
        if tied:
            self.proj = layers.tied_unembedding(d_model, vocab_size)
        else:
            self.proj = layers.unembedding(d_model, vocab_size)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.tied:
            return self.proj(self.norm(x), weight)
        return self.proj(self.norm(x))
