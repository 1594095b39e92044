"""The single-process model's initial parameters, produced one layer at a time.

A parallel rank needs only its slices of the initial weights, but they must be exactly the
single-process model's (every layout starts from the same point; the equivalence tests rely on
it). Building the whole model on every rank to slice it costs a full fp32 copy per rank: 28 GB
for a 7B model, times the ranks of a node. Instead the parts of the model are built here one at
a time by walking the same `construction_plan` MTPModel's constructor walks, from the same seeded
global generator (so every random draw, PyTorch's default layer init included, happens in the
same order), and their parameters handed out before the next part exists: peak extra memory is
one layer. tests/test_model.py checks the stream equals `torch.manual_seed(seed); MTPModel(cfg)`
bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import ModelConfig
from .layers import LocalLayers
from .params import canonical_name
from .transformer import construction_plan


def initial_parameters(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical parameter name, float32 initial value) in construction order.

    Runs on a forked global RNG seeded with `seed` (the caller's RNG state is untouched);
    the consumer must not draw random numbers between items."""
    layers = LocalLayers(cfg.init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for owner, build in construction_plan(cfg):
            for path, param in build(layers).named_parameters():
                yield canonical_name(owner, path), param.detach()
