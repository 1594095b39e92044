"""Every layout trains like the single-process reference (CPU, gloo, float32).

float32, not float64: DeepSpeed's CPU accelerator refuses float64 gradient all-reduce, ZeRO keeps
float32 master weights, and Megatron's vocab_parallel_cross_entropy computes in float32. Observed
differences are ~1e-7 (losses, gradients) and ~3e-5 (parameters after 3 AdamW steps at lr 1e-2,
where Adam's normalisation amplifies rounding); the tolerances sit a few times above them and far
below a real bug (a missing head, an unreduced gradient or a wrong clip is >= 1e-3).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DP_CHANGE, LAYOUTS, SAVE_AT, STEPS, dp_size
from reference import TRAIN, reference

pytestmark = pytest.mark.distributed

LOSS_ATOL = 1e-5  # per-head losses are ~4.2
GRAD_ATOL = 1e-6  # gradients up to ~0.45
PARAM_ATOL = 1e-4  # weights ~0.02, AdamW steps of 1e-2


@functools.cache
def _reference(rows: int) -> dict:
    from conftest import MAX_DP
    from reference import make_batches

    data = make_batches(STEPS * TRAIN["grad_accum_steps"], TRAIN["micro_batch_size"] * MAX_DP)
    return reference(data[:, :rows], STEPS, {"micro_batch_size": rows}, params_at=SAVE_AT)


def _check(name: str, results: dict) -> dict:
    assert name in results, f"{name}: no result (an earlier layout in its job failed)"
    result = results[name]
    assert "error" not in result, f"{name} failed:\n{result['error']}"
    return result


def _layout_result(name: str, request) -> dict:
    """The spawned job of this layout's world size runs once per session (conftest.py)."""
    return _check(name, request.getfixturevalue(f"world{LAYOUTS[name][0]}"))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process(name: str, request) -> None:
    result = _layout_result(name, request)
    ref = _reference(TRAIN["micro_batch_size"] * dp_size(name))
    # Clipping must be active for the norm check to mean anything.
    assert min(ref["norms"]) > TRAIN["grad_clip"]
    got, want = torch.tensor(result["losses"]), torch.tensor(ref["losses"])
    torch.testing.assert_close(got, want.to(got.dtype), atol=LOSS_ATOL, rtol=0)
    assert set(result["grads"]) == set(ref["grads"]), f"{name}: gradient names differ"
    for n, g in ref["grads"].items():
        torch.testing.assert_close(result["grads"][n].float(), g, atol=GRAD_ATOL, rtol=0, msg=n)
    assert set(result["params"]) == set(ref["params"])
    for n, p in ref["params"].items():
        torch.testing.assert_close(result["params"][n].float(), p, atol=PARAM_ATOL, rtol=0, msg=n)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_resume_gives_the_same_next_losses(name: str, request) -> None:
    result = _layout_result(name, request)
    assert len(result["resumed"]) == STEPS - SAVE_AT
    torch.testing.assert_close(
        torch.tensor(result["resumed"]), torch.tensor(result["losses"][SAVE_AT:]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_consolidated_checkpoint_is_the_single_process_model(name: str, request) -> None:
    result = _layout_result(name, request)
    consolidated, params = result["consolidated"], result["params"]
    assert set(consolidated) == set(params)
    for n, p in params.items():
        assert consolidated[n].shape == p.shape, n
        torch.testing.assert_close(consolidated[n], p.float(), atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("name", sorted(DP_CHANGE))
def test_resume_with_a_different_data_parallel_size(name: str, world1) -> None:
    result = _check(name, world1)
    ref = _reference(TRAIN["micro_batch_size"] * dp_size(DP_CHANGE[name]))
    torch.testing.assert_close(
        torch.tensor(result["resumed"]),
        torch.tensor(ref["losses"][SAVE_AT:]),
        atol=LOSS_ATOL,
        rtol=0,
    )
