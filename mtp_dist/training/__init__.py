"""Training: the loop, engines, tracking (the checkpoint format is mtp_dist.checkpoint)."""

from .engine import LocalEngine, StepMetrics, TrainEngine
from .runtime import Runtime
from .trainer import Trainer, TrainingAborted

__all__ = ["LocalEngine", "Runtime", "StepMetrics", "TrainEngine", "Trainer", "TrainingAborted"]
