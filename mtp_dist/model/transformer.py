"""The multi-token-prediction model: embedding -> trunk -> n heads -> shared unembedding.

Gloeckle et al. 2024: a shared trunk feeds n independent one-layer heads; head i predicts token
t+i; the loss is the plain sum of the n cross-entropies. n = 1 is the ordinary next-token model.

    tokens (B, T) -> embed (B, T, d) -> trunk layers -> h (B, T, d)
    h -> head_i layer -> final norm -> unembedding -> logits_i (B, T, V)   for i = 1..n
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from .chain import ChainedHeads, ChainModule, zero_first_position
from .heads import HeadReduction, LossOutput, MultiTokenHeads
from .layers import Block, LayerFactory, LocalLayers, Unembedding, rotary_tables
from .params import Owner, ParamSpec, ParamTable, canonical_name


def construction_plan(cfg: ModelConfig) -> list[tuple[Owner, Callable[[LayerFactory], nn.Module]]]:
    """(owner, builder) of each part of the model, in the order it is built: the embedding, the
    trunk layers, the n head layers, the shared final norm + unembedding. MTPModel's constructor
    and the initialisation replay (init.py) both walk this list, so every random draw of the
    default initialisation happens in the same order in both."""

    def block(layers: LayerFactory) -> nn.Module:
        return make_block(cfg, layers)

    plan: list[tuple[Owner, Callable[[LayerFactory], nn.Module]]] = [
        (Owner("embed"), lambda layers: layers.embedding(cfg.vocab_size, cfg.d_model))
    ]

    def module(layers: LayerFactory) -> nn.Module:
        return ChainModule(cfg.d_model, cfg.norm_eps, layers, block)

    plan += [(Owner("trunk", k), block) for k in range(cfg.trunk_layers)]
    # The chained family's depth 0 is the main model's last layer, like the parallel head 1;
    # its heads 1..n-1 are chained modules (model/chain.py).
    plan += [
        (Owner("head", i), module if cfg.chained and i > 0 else block) for i in range(cfg.n_future)
    ]
    plan.append(
        (
            Owner("unembed"),
            lambda layers: Unembedding(
                cfg.d_model, cfg.vocab_size, cfg.norm_eps, layers, tied=cfg.tie_embeddings
            ),
        )
    )
    return plan


def make_block(cfg: ModelConfig, layers: LayerFactory) -> Block:
    """One transformer layer of this model (trunk layer or head), built by `layers`."""
    return Block(
        cfg.d_model,
        cfg.n_attn_heads,
        cfg.ffn_width,
        cfg.norm_eps,
        layers,
        cfg.kv_heads,
        head_dim=cfg.attn_head_dim,
        attn_bias=cfg.attn_bias,
    )


class MTPModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layers: LayerFactory | None = None,
        head_layers: LayerFactory | None = None,
        head_ids: Sequence[int] | None = None,
        head_reduction: HeadReduction | None = None,
        sequence_gather=None,
        sequence_positions=None,
    ) -> None:
        """`layers` builds every layer; `head_layers`, if given, the heads and the shared
        unembedding instead (head parallelism keeps them whole under a tensor-parallel trunk).
        `head_ids` (default: all) are the heads this model holds and runs, and
        `head_reduction` sums what they share with the heads held elsewhere (head
        parallelism; the model itself knows no process group). `sequence_gather` (chained
        family, sequence parallelism) gathers a module's output over the sequence before the
        projection; `sequence_positions` maps the sequence's positions (T,) to those of this
        rank's slice of the residual stream (default identity), for the chained modules'
        position-0 rule."""
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (normally from the tokenizer)")
        layers = layers or LocalLayers(cfg.init_std)
        self.cfg = cfg
        self._sequence_positions = sequence_positions or (lambda positions: positions)
        held = set(range(cfg.n_future) if head_ids is None else head_ids)
        trunk, blocks, unembed = [], {}, None
        for owner, build in construction_plan(cfg):
            if owner.kind == "embed":
                self.embed = build(layers)
            elif owner.kind == "trunk":
                trunk.append(build(layers))
            elif owner.kind == "head" and owner.index in held:
                blocks[owner.index] = build(head_layers or layers)
            elif owner.kind == "unembed":
                unembed = build(head_layers or layers)
        self.trunk = nn.ModuleList(trunk)
        family = MultiTokenHeads
        extra = {}
        if cfg.chained:
            family = ChainedHeads
            extra = dict(loss_weight=cfg.chain_loss_weight, sequence_gather=sequence_gather)
        self.heads = family(
            blocks,
            unembed,
            **extra,
            n_future=cfg.n_future,
            token_loss=(head_layers or layers).token_loss,
            loss_impl=cfg.loss_impl,
            loss_chunk=cfg.loss_chunk,
            pad_id=cfg.pad_id,
            reduction=head_reduction,
            # Tied embeddings: the heads project by the embedding's matrix, which stays the
            # embedding's parameter (one tensor, `embed.weight`; its two gradients add up).
            tied_weight=self.embed.weight if cfg.tie_embeddings else None,
        )
        cos, sin = rotary_tables(
            cfg.attn_head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling
        )
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
        head i at position t targets labels[:, t + i - 1]; IGNORE_INDEX (-100) is masked.

        When nothing beneath the heads trains (the embedding and trunk frozen), the trunk runs
        without autograd: none of its activations are kept and its backward is skipped."""
        trunk_trains = any(p.requires_grad for p in self.embed.parameters()) or any(
            p.requires_grad for p in self.trunk.parameters()
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and trunk_trains):
            h, cos, sin = self.trunk_forward(input_ids)
            if self.cfg.chained:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
                ahead = self.embed_ahead(labels, positions)
        if self.cfg.chained:
            return self.heads(h, labels, cos, sin, ahead)
        return self.heads(h, labels, cos, sin)

    def embed_ahead(self, labels: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Chained modules' token inputs: E x_{t+k} for k = 1..n-1 at input positions
        `positions` (T,), each (B, T, d), zero at sequence position 0. labels[:, j] is token
        j + 1, so module k at position t reads labels[:, t + k - 1]. Under sequence
        parallelism the embedding returns this rank's slice of the T positions, and
        `sequence_positions` says which."""
        T = positions.shape[-1]
        local = self._sequence_positions(positions)
        out = []
        for k in range(1, self.cfg.n_future):
            ids = labels[:, k - 1 : k - 1 + T].clamp(min=0)  # ignored labels (-100) embed as 0
            if ids.shape[1] < T:  # short labels: those positions' targets lie past the end
                ids = torch.nn.functional.pad(ids, (0, T - ids.shape[1]))
            out.append(zero_first_position(self.embed(ids), local))
        return out

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


class _RoleRecorder(LocalLayers):
    """LocalLayers that remember which factory method made each parameter (its role)."""

    def __init__(self, init_std: float) -> None:
        super().__init__(init_std)
        self.roles: dict[nn.Parameter, str] = {}

    def _made(self, module: nn.Module, role: str) -> nn.Module:
        for param in module.parameters():
            self.roles[param] = role
        return module

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._made(super().column(in_features, out_features, bias), "column")

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return self._made(super().row(in_features, out_features), "row")

    def replicated(self, in_features: int, out_features: int) -> nn.Module:
        return self._made(super().replicated(in_features, out_features), "replicated")

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return self._made(super().embedding(vocab_size, dim), "embedding")

    def norm(self, dim: int, eps: float) -> nn.Module:
        return self._made(super().norm(dim, eps), "norm")

    def unembedding(self, dim: int, vocab_size: int) -> nn.Module:
        return self._made(super().unembedding(dim, vocab_size), "unembedding")


def parameter_table(cfg: ModelConfig) -> ParamTable:
    """The model's parameter table (params.py), read off the model built on the meta device:
    names and shapes from its modules, roles from the layer factory calls that made them."""
    recorder = _RoleRecorder(cfg.init_std)
    specs = []
    with torch.device("meta"):
        for owner, build in construction_plan(cfg):
            for path, param in build(recorder).named_parameters():
                name = canonical_name(owner, path)
                specs.append(
                    ParamSpec(name, tuple(param.shape), owner, path, recorder.roles[param])
                )
    return ParamTable(specs)
