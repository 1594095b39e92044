"""Sequence-parallel building blocks in one process (a 1-rank gloo group): the saved-slice
mechanism engages and leaves values and gradients unchanged. The multi-rank equivalence with the
single-process model is in tests/distributed (tp2_sp, tp2_pp2_sp, tp2_dp2_sp_zero2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from layouts import free_port

from mtp_dist.distributed.sequence_parallel import (
    gather_sequence,
    reduce_scatter_sequence,
    saving_slices,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_consumers_save_the_slice_and_share_one_regather(group):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    full = gather_sequence(x, group)
    outs = []
    for w in weights:  # like q, k, v reading one gathered norm output
        with saving_slices(full):
            outs.append(torch.nn.functional.linear(full, w))
    regather = full.sp_regather
    assert regather.pending == 3  # each consumer saved the slice handle, not the full tensor
    loss = sum((o * o).sum() for o in outs)
    loss.backward()
    assert regather.pending == 0 and regather._full is None  # re-gathered once, then dropped

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = [w.detach().clone().requires_grad_(True) for w in weights]
    sum((torch.nn.functional.linear(x_ref, w) ** 2).sum() for w in w_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=0)
    for w, r in zip(weights, w_ref):
        torch.testing.assert_close(w.grad, r.grad, rtol=1e-12, atol=0)


def test_other_saved_tensors_are_untouched(group):
    x = torch.randn(1, 4, 3, requires_grad=True)
    full = gather_sequence(x, group)
    with saving_slices(full):
        y = torch.nn.functional.linear(full * 2.0, torch.randn(2, 3, requires_grad=True))
    assert full.sp_regather.pending == 0  # `full * 2` is a new tensor: saved as usual
    y.sum().backward()
    assert x.grad is not None


def test_reduce_scatter_output_is_contiguous(group):
    # It becomes the residual stream, which a pipeline stage sends as is.
    out = reduce_scatter_sequence(torch.ones(2, 3, 4), group)
    assert out.shape == (2, 3, 4) and out.is_contiguous()
