"""The one topology object: parallel sizes, rank layout, process groups.

Layout (the rank order Megatron-core calls "tp-cp-ep-dp-pp" and DeepSpeed's
`PipeModelDataParallelTopology` calls axes ['pipe', 'data', 'model']; the last varies fastest):

    rank = model_rank + model * (data_rank + data * pipe_rank)

The "model" axis is Megatron's tensor-parallel axis. It is `tensor` ranks wide, or `head` ranks
wide when tensor == 1 and head > 1: head parallelism then occupies the tensor axis of the layout
(the trunk is replicated over it, exactly as the heads' default group is "the tensor-parallel
group of the last pipeline stage" when tensor == head). Everything here except `build_groups` and
`MegatronMPU` is pure arithmetic, so tests check layouts up to 64 ranks with no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..config import ModelConfig, ParallelConfig, RunConfig


class TopologyError(ValueError):
    """A parallel layout whose arithmetic does not work; the message says why."""


class Coord(NamedTuple):
    pipe: int
    data: int
    model: int


@dataclass(frozen=True)
class Topology:
    """Sizes of the data-, pipeline-, tensor- and head-parallel groups over `world_size` ranks."""

    world_size: int
    tensor: int = 1
    pipeline: int = 1
    head: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tensor", "pipeline", "head"):
            if getattr(self, name) < 1:
                raise TopologyError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.tensor > 1 and self.head not in (1, self.tensor):
            raise TopologyError(
                f"parallel.head={self.head} with parallel.tensor={self.tensor}: the head-parallel "
                "group is the tensor-parallel group of the last stage, so head must be 1 or equal "
                "to tensor"
            )
        per_replica = self.model * self.pipeline
        if self.world_size % per_replica:
            raise TopologyError(
                f"world size {self.world_size} is not divisible by model-parallel size "
                f"{self.model} (tensor={self.tensor}, head={self.head}) x pipeline={self.pipeline}"
                f" = {per_replica}"
            )

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> Topology:
        return cls(world_size, parallel.tensor, parallel.pipeline, parallel.head)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def model(self) -> int:
        """Width of the model (Megatron tensor) axis: tensor, or head when tensor == 1."""
        return max(self.tensor, self.head)

    @property
    def data(self) -> int:
        return self.world_size // (self.model * self.pipeline)

    def check_model(self, cfg: ModelConfig) -> None:
        """Does this layout divide this model? Raises TopologyError naming the quantity."""
        tp = self.tensor
        checks = [
            (cfg.n_attn_heads % tp == 0, f"model.n_attn_heads={cfg.n_attn_heads}"),
            # Megatron's rule too: each rank keeps whole key/value heads (none replicated).
            (cfg.kv_heads % tp == 0, f"key/value heads {cfg.kv_heads} (model.n_kv_heads)"),
            (cfg.d_model % tp == 0, f"model.d_model={cfg.d_model}"),
            (cfg.ffn_width % tp == 0, f"ffn width {cfg.ffn_width}"),
            (cfg.vocab_size % tp == 0, f"model.vocab_size={cfg.vocab_size}"),
        ]
        for ok, what in checks:
            if not ok:
                raise TopologyError(f"{what} is not divisible by parallel.tensor={tp}")
        if self.head > cfg.n_future:
            raise TopologyError(
                f"parallel.head={self.head} exceeds model.n_future={cfg.n_future}: "
                "every head-parallel rank needs at least one head"
            )
        if self.head > 1 and cfg.loss_impl != "sequential":
            raise TopologyError("parallel.head > 1 needs model.loss_impl=sequential")
        stages = cfg.trunk_layers + 2  # embedding, trunk blocks, heads
        if self.pipeline > stages:
            raise TopologyError(
                f"parallel.pipeline={self.pipeline} exceeds the {stages} pipeline layers "
                f"(embedding + {cfg.trunk_layers} trunk blocks + heads)"
            )

    # -- rank layout --------------------------------------------------------------------------
    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} outside world size {self.world_size}")
        model = rank % self.model
        data = (rank // self.model) % self.data
        return Coord(rank // (self.model * self.data), data, model)

    def rank(self, pipe: int, data: int, model: int) -> int:
        return model + self.model * (data + self.data * pipe)

    def groups(self, axis: str) -> list[list[int]]:
        """All groups along `axis` ('model', 'data' or 'pipe'), each a sorted rank list."""
        sizes = {"pipe": self.pipeline, "data": self.data, "model": self.model}
        if axis not in sizes:
            raise TopologyError(f"unknown axis {axis!r}")
        others = [a for a in ("pipe", "data", "model") if a != axis]
        out = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                fixed = {others[0]: i, others[1]: j}
                out.append(sorted(self.rank(**fixed, **{axis: k}) for k in range(sizes[axis])))
        return sorted(out)

    def group_of(self, axis: str, rank: int) -> list[int]:
        return next(g for g in self.groups(axis) if rank in g)

    def head_ids(self, rank: int, n_future: int) -> tuple[int, ...]:
        """The output heads this rank runs: contiguous, as even as possible."""
        if self.head == 1:
            return tuple(range(n_future))
        k = self.coord(rank).model
        lo, hi = k * n_future // self.head, (k + 1) * n_future // self.head
        return tuple(range(lo, hi))

    # -- the two libraries' views of the same layout ----------------------------------------
    def megatron_groups(self, axis: str) -> list[list[int]]:
        """What Megatron-core's RankGenerator builds for this layout ('tp', 'dp' or 'pp')."""
        from megatron.core.parallel_state import RankGenerator

        gen = RankGenerator(
            tp=self.model, ep=1, dp=self.data, pp=self.pipeline, cp=1, order="tp-cp-ep-dp-pp"
        )
        return sorted(sorted(g) for g in gen.get_ranks(axis))

    def deepspeed_topology(self):
        """DeepSpeed's pipeline ProcessTopology for this layout (axes pipe, data, model)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(
            num_pp=self.pipeline, num_mp=self.model, num_dp=self.data
        )

    def __str__(self) -> str:
        return (
            f"world={self.world_size} data={self.data} pipeline={self.pipeline} "
            f"tensor={self.tensor} head={self.head}"
        )


def check_layout(cfg: RunConfig, topo: Topology) -> None:
    """Everything a run's config must satisfy for this layout, checked before any group exists."""
    topo.check_model(cfg.model)
    stage = cfg.parallel.zero_stage
    if stage > 1 and topo.pipeline > 1:
        raise TopologyError(
            f"parallel.zero_stage={stage} with parallel.pipeline={topo.pipeline}: DeepSpeed's "
            "pipeline engine supports ZeRO stage 0 or 1 only"
        )


def check_launch(cfg: RunConfig, world_size: int) -> Topology:
    """The layout against the launch (`mtp train`, before any process group, tokenizer or data
    work): the world divides into the parallel sizes and they divide the model. The vocabulary
    is checked again when the engine is built, once the tokenizer has set it."""
    try:
        topo = Topology.from_config(cfg.parallel, world_size)
        check_layout(cfg, topo)
    except TopologyError as err:
        one = " (one process: launchers/torchrun.sh starts several)" if world_size == 1 else ""
        raise TopologyError(f"WORLD_SIZE={world_size}{one}: {err}") from err
    return topo


def build_groups(topo: Topology) -> None:
    """Create the process groups once, through Megatron-core's parallel_state, and check that
    they are the ones this topology describes. Needs torch.distributed initialised."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.get_world_size() != topo.world_size:
        raise TopologyError(f"process group has {dist.get_world_size()} ranks, topology {topo}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topo.model,
        pipeline_model_parallel_size=topo.pipeline,
        # Megatron's extra gloo groups serve its distributed optimizer, which we do not use
        # (DeepSpeed is); skipping them also lets a fake process group dry-run any layout.
        create_gloo_process_groups=False,
    )
    rank = dist.get_rank()
    got = {
        "model": parallel_state.get_tensor_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "pipe": parallel_state.get_pipeline_model_parallel_group(),
    }
    for axis, group in got.items():
        ranks = sorted(dist.get_process_group_ranks(group))
        if ranks != topo.group_of(axis, rank):
            raise TopologyError(f"Megatron {axis} group {ranks} != {topo.group_of(axis, rank)}")


class MegatronMPU:
    """The `mpu` DeepSpeed is told about (no pipeline): Megatron-core's groups, by name.

    DeepSpeed sums gradient norms over `get_model_parallel_group` and counts a parameter there
    only on tensor rank 0 unless it carries `tensor_model_parallel` (Megatron's attribute); with
    head parallelism the model axis is the head group, and head-owned parameters are marked so.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()
