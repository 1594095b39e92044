"""Transformer layers in the form decoding runs them: the same arithmetic, fewer operations.

Decoding a small model on a CPU is dominated by per-operation overhead (a layer's arithmetic for
one token is a few microseconds; dispatching its ~45 tensor operations and ~12 module calls
costs most of a millisecond). `FusedBlock` computes exactly what `mtp_dist.model.layers.Block`
computes with about half the operations: q, k and v from one matmul over their stacked weights,
gate and up from another, q and k rotated in one call, RMSNorm through `F.rms_norm`, and no
module calls. The norm gains stay separate multiplications (folding them into the weights, as
the draft heads do, would change the rounding of the next-token path), so outputs equal the
module path up to floating-point roundoff between differently shaped matmuls (exact in the
float64 tests, which compare decoding with the uncached model token for token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.layers import Block, apply_rotary


class FusedBlock:
    """A `Block`'s weights (shared, not copied, except the stacked projections) and its forward
    with a KV cache: `(x (B, T, d), cos, sin, cache) -> (B, T, d)`."""

    def __init__(self, block: Block) -> None:
        attn, mlp = block.attn, block.mlp
        self.head_dim = attn.head_dim
        self.eps = block.attn_norm.eps
        w = lambda layer: layer.weight.detach()
        # Projections stored (in, out), contiguous: `x @ w` over that layout ran ~2x faster than
        # F.linear over (out, in) for one token on the CPUs measured (docs/benchmarks.md).
        t = lambda *layers: torch.cat([w(x) for x in layers], dim=0).t().contiguous()
        self.attn_gain = w(block.attn_norm)
        self.mlp_gain = w(block.mlp_norm)
        self.wqkv = t(attn.wq, attn.wk, attn.wv)  # (d, 3d)
        self.wo = t(attn.wo)  # (d, d)
        self.w_gate_up = t(mlp.w_gate, mlp.w_up)  # (d, 2f)
        self.w_down = t(mlp.w_down)  # (f, d)

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache
    ) -> torch.Tensor:
        B, T, d = x.shape
        hd = self.head_dim
        H = d // hd
        h = F.rms_norm(x, (d,), self.attn_gain, self.eps)
        qkv = (h @ self.wqkv).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        qk = apply_rotary(qkv[:2].reshape(2 * B, H, T, hd), *_twice(cos, sin, B))
        q, k = qk.view(2, B, H, T, hd)
        k_all, v_all, mask = cache.update(k, qkv[2])
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, H, T, hd)
        x = x + y.transpose(1, 2).reshape(B, T, d) @ self.wo
        h = F.rms_norm(x, (d,), self.mlp_gain, self.eps)
        gate, up = (h @ self.w_gate_up).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ self.w_down


def _twice(cos: torch.Tensor, sin: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for q and k stacked along the batch: per-sequence tables (B, T, hd/2) are
    repeated; shared ones (T, hd/2) broadcast as they are."""
    if cos.dim() == 3:
        return cos.repeat(2, 1, 1), sin.repeat(2, 1, 1)
    return cos, sin


class FusedUnembedding:
    """The shared final norm + unembedding with the projection stored (d, V), contiguous."""

    def __init__(self, norm_weight: torch.Tensor, proj_weight: torch.Tensor, eps: float) -> None:
        self.gain, self.eps = norm_weight.detach(), eps
        self.proj = proj_weight.detach().t().contiguous()  # (d, V)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.gain, self.eps) @ self.proj
