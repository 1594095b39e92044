"""Model code: architecture only, no process groups (parallelism is applied from outside)."""

from .heads import LossOutput, MultiTokenHeads, shift_labels
from .layers import IGNORE_INDEX, LayerFactory, LocalLayers
from .transformer import MTPModel, count_parameters, split_window

__all__ = [
    "IGNORE_INDEX",
    "LayerFactory",
    "LocalLayers",
    "LossOutput",
    "MTPModel",
    "MultiTokenHeads",
    "count_parameters",
    "shift_labels",
    "split_window",
]
