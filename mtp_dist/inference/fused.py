"""Transformer layers in the form decoding runs them: the same arithmetic, fewer operations.

Decoding a small model on a CPU is dominated by per-operation overhead: a layer's matmuls for
one token take ~0.1 ms, and each of its other tensor operations costs 3-30 µs of dispatch
whatever its size (docs/benchmarks.md, "Decoding with fewer operations"). `FusedBlock`
computes exactly what `mtp_dist.model.layers.Block` computes in about 20 operations and no
module calls:

- q, k and v from one matmul over their stacked weights, gate and up from another, the
  residual adds folded into `addmm`; projections stored (in, out), contiguous (`x @ w` over
  that layout ran ~2x faster than F.linear over (out, in) for one token on the CPUs measured);
- rotary embedding as ONE complex multiplication of q and k together. The model rotates
  halves of each head (dims i and i + hd/2 form a pair); here the q/k output columns are
  permuted once so that each pair is adjacent, a complex number. Both q and k get the same
  permutation, so every dot product q·k sums the same products (the cache holds keys in the
  permuted order, consistently); the rotation itself is the same four products and two sums;
- RMSNorm as four elementwise operations (faster than `F.rms_norm`'s CPU kernel at these sizes);
- an additive float attention mask shared by every layer (kv_cache.py).

The norm gains stay separate multiplications (folding them into the weights, as the draft heads
do, would change the rounding of the next-token path), so outputs equal the module path up to
floating-point roundoff between differently shaped matmuls (exact in the float64 tests, which
compare decoding with the uncached model token for token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.layers import Block


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) [* gain] over the last dim (the model's RMSNorm)."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    return x if gain is None else x * gain


def pair_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Output-column order that puts each rotary pair (i, i + hd/2) of every head side by side."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return (torch.arange(n_heads)[:, None] * head_dim + within).reshape(-1)


def rotary_table(model) -> torch.Tensor:
    """The model's rotary tables as unit complex numbers cos + i·sin: (max_len, hd/2),
    complex128 from float64 tables, else complex64 (there is no bf16 complex type)."""
    cos, sin = model.rope_cos, model.rope_sin
    if cos.dtype != torch.float64:
        cos, sin = cos.float(), sin.float()
    return torch.complex(cos, sin)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pair-ordered vectors x (..., hd) by complex freqs broadcasting to (..., hd/2).
    bf16/fp16 x is rotated in fp32 (view_as_complex takes no bf16) and rounded back."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return rotate(x.float(), freqs).to(x.dtype)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs).flatten(-2)


class FusedBlock:
    """A `Block`'s weights (shared, not copied, except the stacked projections) and its forward
    with a KV cache: `(x (B, T, d), freqs (B | 1, T, 1, hd/2) complex, cache) -> (B, T, d)`."""

    def __init__(self, block: Block) -> None:
        attn, mlp = block.attn, block.mlp
        self.head_dim = attn.head_dim
        self.eps = block.attn_norm.eps
        self.ffn = mlp.w_gate.weight.shape[0]
        w = lambda layer: layer.weight.detach()
        self.n_heads = w(attn.wq).shape[0] // self.head_dim  # q width: n_heads * head_dim
        self.n_kv_heads = w(attn.wk).shape[0] // self.head_dim  # < n_heads: grouped-query
        order = lambda n: pair_order(n, self.head_dim)
        t = lambda *ws: torch.cat(ws, dim=0).t().contiguous()
        self.attn_gain = w(block.attn_norm)
        self.mlp_gain = w(block.mlp_norm)
        wq, wk = w(attn.wq)[order(self.n_heads)], w(attn.wk)[order(self.n_kv_heads)]
        self.wqkv = t(wq, wk, w(attn.wv))  # (d, q width + 2 * kv width)
        # q/k/v biases (Qwen2), pair-ordered as their weights' columns; None without.
        self.bqkv = None
        if attn.wq.bias is not None:
            b = lambda layer: layer.bias.detach()
            bq, bk = b(attn.wq)[order(self.n_heads)], b(attn.wk)[order(self.n_kv_heads)]
            self.bqkv = torch.cat([bq, bk, b(attn.wv)])
        self.wo = t(w(attn.wo))  # (q width, d)
        self.w_gate_up = t(w(mlp.w_gate), w(mlp.w_up))  # (d, 2f)
        self.w_down = t(w(mlp.w_down))  # (f, d)

    def __call__(self, x: torch.Tensor, freqs: torch.Tensor, cache) -> torch.Tensor:
        B, T, d = x.shape
        hd, H, G = self.head_dim, self.n_heads, self.n_kv_heads
        x = x.reshape(B * T, d)
        xn = rms_norm(x, self.attn_gain, self.eps)
        qkv = xn @ self.wqkv if self.bqkv is None else torch.addmm(self.bqkv, xn, self.wqkv)
        qkv = qkv.view(B, T, H + 2 * G, hd)
        qk = rotate(qkv[:, :, : H + G], freqs)  # (B, T, H + G, hd), pair-ordered
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H | G, T, hd)
        k_all, v_all, mask = cache.update(k, qkv[:, :, H + G :].transpose(1, 2))
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=G != H)
        x = torch.addmm(x, y.transpose(1, 2).reshape(B * T, H * hd), self.wo)
        gate_up = rms_norm(x, self.mlp_gain, self.eps) @ self.w_gate_up
        f = self.ffn
        x = torch.addmm(x, F.silu(gate_up[:, :f]) * gate_up[:, f:], self.w_down)
        return x.view(B, T, d)


class FusedUnembedding:
    """The shared final norm + unembedding with the projection stored (d, V), contiguous."""

    def __init__(self, norm_weight: torch.Tensor, proj_weight: torch.Tensor, eps: float) -> None:
        self.gain, self.eps = norm_weight.detach(), eps
        self.proj = proj_weight.detach().t().contiguous()  # (d, V)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gain, self.eps) @ self.proj
