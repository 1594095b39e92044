"""The model's output heads in the forms decoding needs: plain modules and a fused draft stack.

`MultiTokenHeads` owns its parameters flat and runs them through `functional_call` (what ZeRO-3
needs in training). Per decoding step that re-parametrisation costs more than the layer itself
for small models, so decoding runs head 1 and the shared unembedding as ordinary `Block` /
`Unembedding` modules that share (not copy) the head's tensors: the same code and weights, so
the same numbers.

`DraftHeads` runs heads 2..w together for self-speculative decoding: their weights stacked along
a leading head axis, every matmul one `bmm` over all of them, and their attention heads side by
side in one attention call. Drafts only have to be good guesses — head 1 verifies every token —
so this separate implementation cannot change the decoded output; tests check it matches the
model's heads anyway, so that acceptance rates are those of the model. It also does only the
work drafting needs: keys/values at all kept positions (for the caches) but queries, attention
and MLP at one position per sequence (where the next drafts are read).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import MTPModel
from ..model.layers import Block, LocalLayers, Unembedding, apply_rotary
from .kv_cache import LayerCache


def _weights(model: MTPModel, names: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    params = dict(model.heads.named_parameters())
    return {path: params[flat].detach() for path, flat in names}


def head_block(model: MTPModel, i: int) -> Block:
    """Head i (0-based) as a `Block` sharing the model's tensors."""
    cfg = model.cfg
    with torch.device("meta"):
        block = Block(cfg.d_model, cfg.n_attn_heads, cfg.ffn_width, cfg.norm_eps, LocalLayers())
    block.load_state_dict(_weights(model, model.heads.head_param_names[i]), assign=True)
    return block.eval()


def unembedding(model: MTPModel) -> Unembedding:
    """The shared final norm + unembedding as a module sharing the model's tensors."""
    cfg = model.cfg
    with torch.device("meta"):
        unembed = Unembedding(cfg.d_model, cfg.vocab_size, cfg.norm_eps, LocalLayers())
    unembed.load_state_dict(_weights(model, model.heads.shared_param_names), assign=True)
    return unembed.eval()


class DraftHeads:
    """Heads `first`..n-1 (0-based) of a model, fused; see the module docstring."""

    def __init__(self, model: MTPModel, first: int, count: int) -> None:
        cfg = model.cfg
        self.count, self.eps = count, cfg.norm_eps
        self.n_heads, self.head_dim = cfg.n_attn_heads, cfg.d_model // cfg.n_attn_heads
        w = [_weights(model, model.heads.head_param_names[i]) for i in range(first, first + count)]
        stack = lambda key: torch.stack([x[key] for x in w])  # (K, out, in)
        t = lambda key: stack(key).transpose(1, 2).contiguous()  # (K, in, out) for bmm
        self.attn_norm = stack("attn_norm.weight")[:, None, :]  # (K, 1, d)
        self.mlp_norm = stack("mlp_norm.weight")[:, None, :]
        self.wq, self.wo, self.w_down = (
            t("attn.wq.weight"),
            t("attn.wo.weight"),
            t("mlp.w_down.weight"),
        )
        self.wkv = torch.cat([t("attn.wk.weight"), t("attn.wv.weight")], dim=2)  # (K, d, 2d)
        self.w_gate_up = torch.cat([t("mlp.w_gate.weight"), t("mlp.w_up.weight")], dim=2)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The model's RMSNorm, applied for all K heads: (K or 1, N, d) * (K, 1, d).
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _split_heads(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """(K, B*T, d) -> (B, K*H, T, hd): the K heads' attention heads side by side."""
        K, H, hd = self.count, self.n_heads, self.head_dim
        return x.view(K, B, T, H, hd).permute(1, 0, 3, 2, 4).reshape(B, K * H, T, hd)

    def __call__(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        last: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Trunk output h (B, S, d) of the S new cache positions; `last` (B,): per sequence the
        position (index into S) whose head outputs are wanted. Returns (B, K, d)."""
        B, S, d = h.shape
        K = self.count
        rows = torch.arange(B, device=h.device)
        # Keys and values at all S positions, for the cache.
        xn = self._norm(h.reshape(1, B * S, d), self.attn_norm)  # (K, B*S, d)
        k, v = torch.bmm(xn, self.wkv).split(d, dim=2)  # (K, B*S, d) each
        k = apply_rotary(self._split_heads(k, B, S), cos, sin)  # (B, K*H, S, hd)
        k_all, v_all, _ = cache.update(k, self._split_heads(v, B, S))
        # Query, attention and MLP at one position per sequence.
        x = h[rows, last][None]  # (1, B, d)
        q = torch.bmm(self._norm(x, self.attn_norm), self.wq)  # (K, B, d)
        q = apply_rotary(
            self._split_heads(q, B, 1), cos[rows, last][:, None], sin[rows, last][:, None]
        )
        slots = torch.arange(k_all.shape[2], device=h.device)
        visible = slots[None, :] <= (cache.state.lengths + last)[:, None]  # (B, S_used)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible[:, None, None])
        y = y.view(B, K, d).transpose(0, 1)  # (K, B, d)
        x = x + torch.bmm(y, self.wo)
        gate, up = torch.bmm(self._norm(x, self.mlp_norm), self.w_gate_up).chunk(2, dim=2)
        x = x + torch.bmm(F.silu(gate) * up, self.w_down)  # (K, B, d)
        return x.transpose(0, 1)  # (B, K, d)
