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
from ..model.chain import ChainModule
from ..model.heads import TIED_WEIGHT
from ..model.layers import Block, LocalLayers, Unembedding
from ..model.transformer import make_block
from .fused import pair_order, rotate
from .kv_cache import LayerCache


def _weights(model: MTPModel, names: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    params = model.heads.weights()
    return {path: params[flat].detach() for path, flat in names}


def head_block(model: MTPModel, i: int) -> Block:
    """Head i (0-based) as a `Block` sharing the model's tensors."""
    with torch.device("meta"):
        block = make_block(model.cfg, LocalLayers())
    block.load_state_dict(_weights(model, model.heads.head_param_names[i]), assign=True)
    return block.eval()


def chain_module(model: MTPModel, k: int) -> ChainModule:
    """Module k (1..n-1) of a chained model as a `ChainModule` sharing the model's tensors."""
    cfg = model.cfg
    with torch.device("meta"):
        module = ChainModule(
            cfg.d_model, cfg.norm_eps, LocalLayers(), lambda layers: make_block(cfg, layers)
        )
    module.load_state_dict(_weights(model, model.heads.head_param_names[k]), assign=True)
    return module.eval()


def unembedding(model: MTPModel) -> Unembedding:
    """The shared final norm + unembedding as a module sharing the model's tensors (an untied
    one: a tied model's projection is its embedding matrix, shared here as `proj.weight`)."""
    cfg = model.cfg
    with torch.device("meta"):
        unembed = Unembedding(cfg.d_model, cfg.vocab_size, cfg.norm_eps, LocalLayers())
    names = list(model.heads.shared_param_names)
    if model.heads.tied_weight is not None:
        names.append(("proj.weight", TIED_WEIGHT))
    unembed.load_state_dict(_weights(model, names), assign=True)
    return unembed.eval()


class DraftHeads:
    """Heads `first`..first+count-1 (0-based) of a model, fused; see the module docstring.

    Decoding small models on a CPU is dominated by per-operation overhead, so this path keeps
    the operation count low: each RMSNorm's gain is folded into the matmul after it
    ((x_hat * g) @ W == x_hat @ (g[:, None] * W)), q/k/v come from one bmm, and q and k get
    their rotary embedding in one complex multiplication."""

    def __init__(self, model: MTPModel, first: int, count: int) -> None:
        cfg = model.cfg
        self.count, self.eps = count, cfg.norm_eps
        self.n_heads, self.head_dim = cfg.n_attn_heads, cfg.attn_head_dim
        self.n_kv_heads = cfg.kv_heads
        w = [_weights(model, model.heads.head_param_names[i]) for i in range(first, first + count)]
        stack = lambda key: torch.stack([x[key] for x in w])  # (K, out, in) or (K, d)
        t = lambda key: stack(key).transpose(1, 2)  # (K, in, out) for bmm
        # q/k output columns pair-ordered for the complex rotary multiplication (fused.py).
        qkv = [
            t("attn.wq.weight")[:, :, pair_order(self.n_heads, self.head_dim)],
            t("attn.wk.weight")[:, :, pair_order(self.n_kv_heads, self.head_dim)],
            t("attn.wv.weight"),
        ]
        gate_up = [t("mlp.w_gate.weight"), t("mlp.w_up.weight")]
        self.wqkv = torch.cat(qkv, dim=2) * stack("attn_norm.weight")[:, :, None]  # (K, d, qkv)
        self.bqkv = None  # q/k/v biases (Qwen2), pair-ordered like the weights' columns
        if "attn.wq.bias" in w[0]:
            q_order = pair_order(self.n_heads, self.head_dim)
            k_order = pair_order(self.n_kv_heads, self.head_dim)
            biases = [stack("attn.wq.bias")[:, q_order], stack("attn.wk.bias")[:, k_order]]
            self.bqkv = torch.cat([*biases, stack("attn.wv.bias")], dim=1)[:, None]  # (K,1,qkv)
        self.w_gate_up = torch.cat(gate_up, dim=2) * stack("mlp_norm.weight")[:, :, None]
        self.wo = t("attn.wo.weight").contiguous()  # (K, d, d)
        self.w_down = t("mlp.w_down.weight").contiguous()  # (K, ffn, d)

    def leading(self, k: int) -> DraftHeads:
        """The same drafter restricted to its first k heads (views of the stacked weights)."""
        sub = object.__new__(DraftHeads)
        sub.__dict__.update(self.__dict__, count=k)
        for name in ("wqkv", "w_gate_up", "wo", "w_down"):
            setattr(sub, name, getattr(self, name)[:k])
        if self.bqkv is not None:
            sub.bqkv = self.bqkv[:k]
        return sub

    def __call__(
        self,
        h: torch.Tensor,
        freqs: torch.Tensor,
        last: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Trunk output h (B, S, d) of the S new cache positions, their rotary factors `freqs`
        (B, S, 1, hd/2) complex (fused.py); `last` (B,): per sequence the position (index
        into S) whose head outputs are wanted. Returns (B, K, d)."""
        B, S, d = h.shape
        K, H, G, hd = self.count, self.n_heads, self.n_kv_heads, self.head_dim
        rows = torch.arange(B, device=h.device)
        xn = F.rms_norm(h, (d,), eps=self.eps).reshape(1, B * S, d).expand(K, -1, -1)
        if self.bqkv is None:
            qkv = torch.bmm(xn, self.wqkv)
        else:
            qkv = torch.baddbmm(self.bqkv, xn, self.wqkv)
        qkv = qkv.view(K, B, S, H + 2 * G, hd)
        qk = rotate(qkv[:, :, :, : H + G], freqs)  # (K, B, S, H + G, hd): all heads, one call
        # The K heads' attention heads side by side: (B, K*H, S, hd) and (B, K*G, S, hd); query
        # head k*H + j reads key/value head k*G + j // (H/G), as grouped-query attention does.
        side = lambda t: t.permute(1, 0, 3, 2, 4).reshape(B, -1, S, hd)
        q, k, v = side(qk[:, :, :, :H]), side(qk[:, :, :, H:]), side(qkv[:, :, :, H + G :])
        # Keys and values of all S positions go to the cache; the query only at `last`.
        k_all, v_all, mask = cache.update(k, v)  # mask (B, 1, S, used)
        q = q[rows, :, last][:, :, None]  # (B, K*H, 1, hd)
        y = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask[rows, :, last, None], enable_gqa=G != H
        )
        x = h[rows, last][None]  # (1, B, d)
        x = x + torch.bmm(y.view(B, K, H * hd).transpose(0, 1), self.wo)  # (K, B, d)
        xm = F.rms_norm(x, (d,), eps=self.eps)
        gate, up = torch.bmm(xm, self.w_gate_up).chunk(2, dim=2)
        x = x + torch.bmm(F.silu(gate) * up, self.w_down)  # (K, B, d)
        return x.transpose(0, 1)  # (B, K, d)
