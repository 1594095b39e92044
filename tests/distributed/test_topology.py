"""The one topology: arithmetic, rank layout, and agreement with Megatron-core and DeepSpeed.

Pure tests need no process group; the fake-backend test builds the real groups (Megatron's
parallel_state and DeepSpeed's pipeline grid) for 64-rank layouts inside one process.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtp_dist.config import ModelConfig, load_config
from mtp_dist.distributed.topology import Topology, TopologyError, check_layout

ROOT = Path(__file__).resolve().parents[2]


def _layouts(max_world: int = 64):
    for world in range(1, max_world + 1):
        for tp, pp, head in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4)):
            try:
                yield Topology(world, tp, pp, head)
            except TopologyError:
                continue


def test_layouts_agree_with_megatron_and_deepspeed_up_to_64_ranks() -> None:
    checked = 0
    for topo in _layouts():
        ds = topo.deepspeed_topology()
        for ours, megatron in (("model", "tp"), ("data", "dp"), ("pipe", "pp")):
            groups = topo.groups(ours)
            assert groups == topo.megatron_groups(megatron), (str(topo), ours)
            assert groups == sorted(sorted(g) for g in ds.get_axis_comm_lists(ours)) or (
                len(groups[0]) == 1 and ds.get_axis_comm_lists(ours) == []
            ), (str(topo), ours)
        for rank in range(topo.world_size):
            assert tuple(ds.get_coord(rank)) == tuple(topo.coord(rank))
            assert topo.rank(*topo.coord(rank)) == rank
        checked += 1
    assert checked > 300


def test_groups_partition_the_world() -> None:
    topo = Topology(16, tensor=2, pipeline=2, head=2)
    assert (topo.data, topo.model) == (4, 2)
    for axis in ("model", "data", "pipe"):
        flat = sorted(r for g in topo.groups(axis) for r in g)
        assert flat == list(range(16))
    assert topo.group_of("model", 5) == [4, 5]  # tensor fastest
    assert topo.group_of("pipe", 5) == [5, 13]  # pipeline slowest


@pytest.mark.parametrize(
    ("world", "tensor", "pipeline", "head", "words"),
    [
        (6, 4, 1, 1, ["world size 6", "tensor=4"]),
        (8, 2, 3, 1, ["pipeline=3"]),
        (8, 4, 1, 2, ["head must be 1 or equal to tensor"]),
        (4, 0, 1, 1, ["tensor must be >= 1"]),
    ],
)
def test_bad_arithmetic_is_a_clear_error(world, tensor, pipeline, head, words) -> None:
    with pytest.raises(TopologyError) as err:
        Topology(world, tensor, pipeline, head)
    for word in words:
        assert word in str(err.value)


def test_head_ids_spread_all_heads_over_the_group() -> None:
    topo = Topology(4, head=4)
    assert [topo.head_ids(r, 4) for r in range(4)] == [(0,), (1,), (2,), (3,)]
    topo = Topology(4, tensor=2, head=2)  # data=2: ranks 0,2 and 1,3 share head sets
    assert [topo.head_ids(r, 4) for r in range(4)] == [(0, 1), (2, 3), (0, 1), (2, 3)]
    assert Topology(2).head_ids(1, 3) == (0, 1, 2)


def test_model_and_config_checks() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_attn_heads=4, n_future=4)
    Topology(4, tensor=4).check_model(cfg)
    with pytest.raises(TopologyError, match="n_attn_heads=4 is not divisible by parallel.tensor=8"):
        Topology(8, tensor=8).check_model(cfg)
    with pytest.raises(TopologyError, match="parallel.head=8 exceeds model.n_future=4"):
        Topology(8, head=8).check_model(cfg)
    with pytest.raises(TopologyError, match="exceeds the 4 pipeline layers"):
        Topology(8, pipeline=8).check_model(cfg)
    run = load_config(None, ["run_dir=/tmp/x", "model.vocab_size=64", "parallel.pipeline=2",
                             "parallel.zero_stage=2"])  # fmt: skip
    with pytest.raises(TopologyError, match="supports ZeRO stage 0 or 1 only"):
        check_layout(run, Topology(2, pipeline=2))


FAKE = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid
    from megatron.core import parallel_state
    from mtp_dist.distributed.topology import Topology, build_groups

    for world, tp, pp, head, rank in [(64, 4, 4, 1, 37), (64, 1, 2, 4, 63), (48, 2, 3, 2, 17),
                                      (8, 2, 2, 2, 5), (64, 8, 1, 1, 0)]:
        topo = Topology(world, tp, pp, head)
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        build_groups(topo)  # raises if Megatron's groups differ from the topology's
        deepspeed.init_distributed(dist_backend="fake", dist_init_required=False)
        grid = PipelineParallelGrid(topology=topo.deepspeed_topology())
        assert grid.get_data_parallel_group_ranks() == topo.group_of("data", rank), topo
        assert grid.pp_group == topo.group_of("pipe", rank), topo
        assert sorted(grid.slice_group) == topo.group_of("model", rank), topo
        assert grid.get_stage_id() == topo.coord(rank).pipe
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    print("FAKE-OK")
    """
)


@pytest.mark.distributed
def test_real_groups_agree_under_a_fake_process_group() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FAKE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "FAKE-OK" in proc.stdout, proc.stderr[-3000:]
