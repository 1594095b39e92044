"""Deep copies of modules that hold process groups (which cannot be copied)."""

from __future__ import annotations

import copy

from torch import nn


def deepcopy_sharing(module: nn.Module, memo: dict, *shared) -> nn.Module:
    """Deep copy that shares `shared` objects (process groups, Megatron configs) instead of
    copying them: MultiTokenHeads deep-copies a head into a parameter-free meta template, and a
    ProcessGroup cannot be copied."""
    memo.update({id(obj): obj for obj in shared if obj is not None})
    clone = type(module).__new__(type(module))
    memo[id(module)] = clone
    clone.__dict__ = copy.deepcopy(module.__dict__, memo)
    return clone
