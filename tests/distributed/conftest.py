"""Distributed test tier: spawned gloo jobs on CPU, compared with a single-process reference.

Starting a process that imports megatron-core and DeepSpeed costs ~15-25 s on this machine, so
each world size runs ONE spawned job that goes through several layouts (tests/distributed/
worker.py); the session-scoped fixtures below run each job once and the tests read its results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from layouts import (  # noqa: E402
    DP_CHANGE,
    DP_GROW,
    LAYOUTS,
    MAX_DP,
    NAN_CHECK,
    OPTIONS,
    SAVE_AT,
    STEPS,
    dp_size,
    free_port,
    reference_changes,
)  # fmt: skip
from reference import DATA, MODEL, TRAIN, make_batches  # noqa: E402

WORKER = Path(__file__).parent / "worker.py"


def run_job(
    world: int, jobs: list[dict], root: Path, batches: Path, timeout: int = 600, tag: str = ""
) -> dict:
    out = root / f"results_world{world}{tag}.pt"
    spec = {
        "world": world, "port": free_port(), "out": str(out), "jobs": jobs, "model": MODEL,
        "data": DATA, "train": TRAIN, "batches": str(batches), "tmp": str(root),
    }  # fmt: skip
    spec_file = root / f"spec_world{world}{tag}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(spec_file)], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-5000:]
    return {r["name"]: r for r in torch.load(out, weights_only=False)}


@pytest.fixture(scope="session")
def dist_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="session")
def batches(dist_root) -> tuple[torch.Tensor, Path]:
    data = make_batches(STEPS * TRAIN["grad_accum_steps"], TRAIN["micro_batch_size"] * MAX_DP)
    path = dist_root / "batches.pt"
    torch.save(data, path)
    return data, path


def _layout_jobs(world: int, root: Path) -> list[dict]:
    return [
        {
            "name": n,
            "parallel": par,
            "steps": STEPS,
            "save_at": SAVE_AT,
            "run_dir": str(root / n),
            "nan_check": n in NAN_CHECK,
            **OPTIONS.get(n, {}),
        }  # fmt: skip
        for n, (w, par) in LAYOUTS.items()
        if w == world
    ]


@pytest.fixture(scope="session")
def world2(dist_root, batches) -> dict:
    return run_job(2, _layout_jobs(2, dist_root), dist_root, batches[1])


@pytest.fixture(scope="session")
def world4(dist_root, batches) -> dict:
    return run_job(4, _layout_jobs(4, dist_root), dist_root, batches[1])


@pytest.fixture(scope="session")
def world1(dist_root, batches, world2) -> dict:
    jobs = []
    for name, source in DP_CHANGE.items():
        par = LAYOUTS[source][1]
        model, train = map(dict, reference_changes(source))  # e.g. the source's train.freeze
        jobs.append({
            "name": name, "parallel": par, "steps": STEPS, "save_at": SAVE_AT,
            "run_dir": str(dist_root / name), "resume_from": str(dist_root / source / "ckpt"),
            "model": model,
            "train": {**train, "micro_batch_size": TRAIN["micro_batch_size"] * dp_size(source)},
        })  # fmt: skip
    for stage in sorted(set(DP_GROW.values())):  # the checkpoints world2_grow resumes
        jobs.append({
            "name": f"dp1_zero{stage}", "parallel": {"zero_stage": stage}, "steps": STEPS,
            "save_at": SAVE_AT, "run_dir": str(dist_root / f"dp1_zero{stage}"),
            "train": {"micro_batch_size": TRAIN["micro_batch_size"] * MAX_DP},
        })  # fmt: skip
    return run_job(1, jobs, dist_root, batches[1])


@pytest.fixture(scope="session")
def world2_grow(dist_root, batches, world1) -> dict:
    jobs = [
        {"name": name, "parallel": {"zero_stage": stage}, "steps": STEPS, "save_at": SAVE_AT,
         "run_dir": str(dist_root / name),
         "resume_from": str(dist_root / f"dp1_zero{stage}" / "ckpt")}
        for name, stage in DP_GROW.items()
    ]  # fmt: skip
    return run_job(2, jobs, dist_root, batches[1], tag="_grow")
