"""The distributed Runtime: process group, topology, groups, and the DeepSpeed engine.

`make_runtime(cfg, env)` is what `mtp train` calls when launched with WORLD_SIZE > 1 (torchrun,
srun): the CLI reads the environment into a `LaunchEnv`; nothing below it reads the environment.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..training.runtime import Runtime
from .topology import Topology, build_groups


@dataclass(frozen=True)
class LaunchEnv:
    """Where the launcher put this process (torchrun/srun environment, read by the CLI)."""

    rank: int
    world_size: int
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def resolve_backend(name: str) -> str:
    """'auto': NCCL when CUDA is available (GPU jobs), gloo otherwise (CPU jobs, tests)."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


class DistributedRuntime(Runtime):
    """One rank of a multi-process job laid out by `Topology`."""

    def __init__(self, cfg: RunConfig, env: LaunchEnv) -> None:
        backend = resolve_backend(cfg.parallel.backend)
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
            self.device = torch.device("cuda", env.local_rank)
        else:
            self.device = torch.device("cpu")
        self.topology = Topology.from_config(cfg.parallel, env.world_size)  # validates first
        # DeepSpeed insists on finding these in the environment (its own launcher's contract);
        # the launch environment is handed to us, so we publish it for DeepSpeed, never read it.
        os.environ["LOCAL_RANK"] = str(env.local_rank)
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=self._timeout(cfg),
            )
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
        build_groups(self.topology)
        _set_timeout(self._timeout(cfg))
        self.rank = env.rank
        coord = self.topology.coord(env.rank)
        self.is_main = env.rank == 0
        self.dp_rank, self.dp_size = coord.data, self.topology.data

    def build_engine(self, cfg: RunConfig, initial=None):
        from .engine import DeepSpeedTrainEngine

        engine = DeepSpeedTrainEngine(cfg, self.topology, self.rank, self.device, initial)
        _set_timeout(self._timeout(cfg))  # DeepSpeed may have made groups of its own
        return engine

    @staticmethod
    def _timeout(cfg: RunConfig) -> datetime.timedelta:
        return datetime.timedelta(seconds=cfg.parallel.timeout_s)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum over every rank of the job."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, obj) -> list:
        """One object per data-parallel rank, index = dp rank (from the ranks at model rank 0 of
        the first pipeline stage; the others hold the same data positions)."""
        everyone: list = [None] * self.topology.world_size
        dist.all_gather_object(everyone, obj)
        return [everyone[self.topology.rank(0, d, 0)] for d in range(self.topology.data)]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device


def _set_timeout(timeout: datetime.timedelta) -> None:
    """Give every process group made so far this collective timeout. Megatron's and DeepSpeed's
    groups are created with their own defaults (30 minutes), not the world group's timeout, so
    a dead peer would otherwise hang the data-parallel all-reduce for half an hour."""
    for group in list(dist.distributed_c10d._world.pg_map):
        if not dist.distributed_c10d._rank_not_in_group(group):
            dist.distributed_c10d._set_pg_timeout(timeout, group)


def make_runtime(cfg: RunConfig, env: LaunchEnv) -> DistributedRuntime:
    return DistributedRuntime(cfg, env)
