"""Where this process sits in a job, as the trainer sees it.

`Runtime` is the single-process default; the distributed layer supplies a subclass built from its
topology (data-parallel rank and size, collectives, a DeepSpeed engine). The trainer loop never
reads the environment or touches process groups itself.
"""

from __future__ import annotations

from ..config import RunConfig
from ..model import MTPModel
from .engine import LocalEngine, TrainEngine


class Runtime:
    is_main: bool = True
    dp_rank: int = 0
    dp_size: int = 1

    def build_engine(self, cfg: RunConfig) -> TrainEngine:
        return LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum over all ranks (for throughput and stop flags)."""
        return values

    def gather_objects(self, obj) -> list:
        """One object per data-parallel rank, index = data-parallel rank."""
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
