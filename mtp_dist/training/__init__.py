"""Training: the loop, engines, checkpoints, tracking."""

from .engine import LocalEngine, StepMetrics, TrainEngine
from .runtime import Runtime
from .trainer import Trainer, TrainingAborted

__all__ = ["LocalEngine", "Runtime", "StepMetrics", "TrainEngine", "Trainer", "TrainingAborted"]
