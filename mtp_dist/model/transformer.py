"""The multi-token-prediction model: embedding -> trunk -> n heads -> shared unembedding.

Gloeckle et al. 2024: a shared trunk feeds n independent one-layer heads; head i predicts token
t+i; the loss is the plain sum of the n cross-entropies. n = 1 is the ordinary next-token model.

    tokens (B, T) -> embed (B, T, d) -> trunk layers -> h (B, T, d)
    h -> head_i layer -> final norm -> unembedding -> logits_i (B, T, V)   for i = 1..n
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .heads import LossOutput, MultiTokenHeads
from .layers import Block, LayerFactory, LocalLayers, rotary_tables


class MTPModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layers: LayerFactory | None = None,
        head_layers: LayerFactory | None = None,
    ) -> None:
        """`layers` builds every layer; `head_layers`, if given, the heads and the shared
        unembedding instead (head parallelism keeps them whole under a tensor-parallel trunk)."""
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (normally from the tokenizer)")
        layers = layers or LocalLayers(cfg.init_std)
        self.cfg = cfg
        self.embed = layers.embedding(cfg.vocab_size, cfg.d_model)
        self.trunk = nn.ModuleList(
            Block(cfg.d_model, cfg.n_attn_heads, cfg.ffn_width, cfg.norm_eps, layers)
            for _ in range(cfg.trunk_layers)
        )
        self.heads = MultiTokenHeads(
            n_future=cfg.n_future,
            d_model=cfg.d_model,
            n_attn_heads=cfg.n_attn_heads,
            ffn_hidden=cfg.ffn_width,
            vocab_size=cfg.vocab_size,
            eps=cfg.norm_eps,
            layers=head_layers or layers,
            loss_impl=cfg.loss_impl,
            pad_id=cfg.pad_id,
        )
        cos, sin = rotary_tables(cfg.d_model // cfg.n_attn_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions of shape (T,) or (B, T)."""
        if int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        return self.rope_cos[positions], self.rope_sin[positions]

    def trunk_forward(self, input_ids: torch.Tensor, positions=None, kv_caches=None):
        """(B, T) token ids -> trunk output h (B, T, d), and the rotary tables used."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary(positions)
        x = self.embed(input_ids)  # (B, T, d)
        for j, block in enumerate(self.trunk):
            x = block(x, cos, sin, None if kv_caches is None else kv_caches[j])
        return x, cos, sin

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Training/eval loss. labels[:, j] is the token after input position j (B, >= T);
        head i at position t targets labels[:, t + i - 1]; IGNORE_INDEX (-100) is masked."""
        h, cos, sin = self.trunk_forward(input_ids)
        return self.heads(h, labels, cos, sin)

    @torch.no_grad()
    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Head-1 logits (B, T, V) without caching: the reference for generation tests."""
        h, cos, sin = self.trunk_forward(input_ids)
        return self.heads.logits(h, cos, sin, 0)


def split_window(window: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed samples (B, seq_len + n_future) -> (input_ids (B, seq_len), labels (B, rest))."""
    return window[:, :seq_len], window[:, 1:]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
