"""The single-process model's initial parameters, produced one layer at a time.

A parallel rank needs only its slices of the initial weights, but they must be exactly the
single-process model's (every layout starts from the same point; the equivalence tests rely on
it). Building the whole model on every rank to slice it costs a full fp32 copy per rank: 28 GB
for a 7B model, times the ranks of a node. Instead the layers are built here one at a time in the
order MTPModel's constructor builds them, from the same seeded global generator (so every
random draw, PyTorch's default layer init included, happens in the same order), and their
parameters handed out before the next layer exists: peak extra memory is one layer.

tests/test_model.py checks the stream equals `torch.manual_seed(seed); MTPModel(cfg)` bit for
bit, so a change to the constructor's order that is not mirrored here fails there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..config import ModelConfig
from .heads import flat_name
from .layers import Block, LocalLayers, Unembedding


def _named(prefix: str, module: nn.Module, flat: bool = False):
    for path, param in module.named_parameters():
        name = f"heads.{flat_name(prefix, path)}" if flat else f"{prefix}.{path}"
        yield name, param.detach()


def initial_parameters(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(MTPModel parameter name, float32 initial value) in construction order.

    Runs on a forked global RNG seeded with `seed` (the caller's RNG state is untouched);
    the consumer must not draw random numbers between items."""
    layers = LocalLayers(cfg.init_std)

    def block() -> Block:
        return Block(cfg.d_model, cfg.n_attn_heads, cfg.ffn_width, cfg.norm_eps, layers)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield from _named("embed", layers.embedding(cfg.vocab_size, cfg.d_model))
        for j in range(cfg.trunk_layers):
            yield from _named(f"trunk.{j}", block())
        for i in range(cfg.n_future):  # MultiTokenHeads: the n head layers, then the unembedding
            yield from _named(f"head{i}", block(), flat=True)
        unembed = Unembedding(cfg.d_model, cfg.vocab_size, cfg.norm_eps, layers)
        yield from _named("unembed", unembed, flat=True)
