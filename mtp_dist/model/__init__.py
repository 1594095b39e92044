"""Model code: architecture only, no process groups (parallelism is applied from outside)."""

from .heads import HeadReduction, LocalHeads, LossOutput, MultiTokenHeads, shift_labels
from .layers import IGNORE_INDEX, LayerFactory, LocalLayers
from .params import Owner, ParamSpec, ParamTable, canonical_name
from .transformer import (
    MTPModel,
    construction_plan,
    count_parameters,
    parameter_table,
    split_window,
)

__all__ = [
    "IGNORE_INDEX",
    "HeadReduction",
    "LayerFactory",
    "LocalHeads",
    "LocalLayers",
    "LossOutput",
    "MTPModel",
    "MultiTokenHeads",
    "Owner",
    "ParamSpec",
    "ParamTable",
    "canonical_name",
    "construction_plan",
    "count_parameters",
    "parameter_table",
    "shift_labels",
    "split_window",
]
