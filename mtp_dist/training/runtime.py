"""Where this process sits in a job, as the trainer sees it.

`Runtime` is the single-process default; the distributed layer supplies a subclass built from its
topology (data-parallel rank and size, collectives, a DeepSpeed engine). The trainer loop never
reads the environment or touches process groups itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import ConfigError, RunConfig
from ..model import MTPModel
from .engine import LocalEngine, TrainEngine


def check_device(cfg: RunConfig, distributed: bool = False) -> None:
    """A device this machine lacks is refused before any work (ConfigError, one line), not
    when the engine is built after the tokenizer and the data."""
    if torch.cuda.is_available():
        return
    if cfg.train.device == "cuda":
        raise ConfigError(
            "train.device=cuda: no CUDA device is available here (torch "
            f"{torch.__version__}); use train.device=auto or train.device=cpu"
        )
    if distributed and cfg.parallel.backend == "nccl":
        raise ConfigError(
            "parallel.backend=nccl: no CUDA device is available here; use parallel.backend=gloo "
            "(or auto) on CPUs"
        )


class Runtime:
    is_main: bool = True
    dp_rank: int = 0
    dp_size: int = 1

    def build_engine(
        self, cfg: RunConfig, initial: Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> TrainEngine:
        """The engine; `initial` (canonical name, full tensor), when given, replaces the random
        initial weights (`mtp train --init-from`)."""
        model = MTPModel(cfg.model)
        if initial is not None:
            model.load_state_dict(dict(initial))
        return LocalEngine(model, cfg.train, cfg.data.seq_len)

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
