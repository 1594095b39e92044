"""Faults: a killed rank and half-written checkpoints.

1. `kill -9` of one worker in the middle of a 2-process torchrun run (launchers/torchrun.sh with
   one restart allowed): torchrun restarts the worker group, the trainer resumes from the latest
   complete checkpoint, and the run ends with exactly the final loss of an uninterrupted run.
2. A half-written checkpoint is never loaded: a `.tmp-step_*` staging directory and a step
   directory without `complete.json` are passed over (resume takes the newest complete one); a
   checkpoint that has its marker but a truncated file stops the resume with an error naming the
   file (the marker says the writer finished, so the damage came later: refusing loudly beats
   silently training on from an older step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from mtp_dist.config import load_config
from mtp_dist.training import Trainer
from mtp_dist.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "tests/slurm/tiny.yaml"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.source={CORPUS}", "tracking.enabled=false", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- 1. kill -9 of a rank, torchrun restart, exact resume ---------------------------------------


def launch(run_dir: Path, *extra: str, restarts: int = 1) -> subprocess.Popen:
    env = {
        **os.environ,
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": str(restarts),
        "PYTHON": sys.executable,
    }
    for var in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    cmd = ["bash", str(REPO / "launchers/torchrun.sh"), str(RECIPE), *overrides(run_dir, *extra)]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group to clean up if the test fails
    )


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun agent's worker processes."""
    import psutil

    found = {}
    for child in psutil.Process(agent_pid).children():
        try:
            environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            found[int(env[b"RANK"])] = child.pid
    return found


def kill_rank_mid_run(proc: subprocess.Popen, run_dir: Path, rank: int, after_step: int) -> int:
    """SIGKILL worker `rank` once a complete checkpoint exists and `after_step` is logged.

    Returns the last step logged before the kill."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the fault could be injected"
        logged = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if ckpt.latest_checkpoint(run_dir) and logged and logged[-1]["step"] >= after_step:
            pids = worker_pids(proc.pid)
            if rank in pids:
                os.kill(pids[rank], signal.SIGKILL)
                return logged[-1]["step"]
        time.sleep(0.02)
    pytest.fail("no checkpoint and no progress within 120 s")


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
def test_kill_one_rank_restarts_and_matches_uninterrupted_run(tmp_path, rank):
    reference = tmp_path / "reference"
    finish(launch(reference, restarts=0))
    expected = metrics(reference)
    assert [r["step"] for r in expected] == list(range(1, 13))
    assert "resumed from" not in (reference / "metrics.jsonl").read_text()

    faulted = tmp_path / "faulted"
    proc = launch(faulted)
    killed_at = kill_rank_mid_run(proc, faulted, rank, after_step=5)
    out = finish(proc)

    assert "resumed from" in out, out[-4000:]
    resumed_step = int(out.split("resumed from")[1].split("at step")[1].split()[0])
    assert 2 <= resumed_step <= killed_at < 12, (resumed_step, killed_at)
    got = metrics(faulted)
    # Steps after the resume point were run twice; the last record of each step is the one kept.
    final = {r["step"]: r for r in got}
    assert sorted(final) == list(range(1, 13))
    assert got[-1]["step"] == 12
    assert got[-1]["loss"] == pytest.approx(expected[-1]["loss"], abs=1e-6)
    assert got[-1]["head_losses"] == pytest.approx(expected[-1]["head_losses"], abs=1e-6)
    assert ckpt.latest_checkpoint(faulted).name == "step_00000012"


# -- 2. half-written checkpoints ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A single-process run with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    Trainer(load_config(RECIPE, overrides(run_dir, "train.max_steps=4"))).fit()
    names = [p.name for p in ckpt.complete_checkpoints(run_dir)]
    assert names == ["step_00000002", "step_00000004"]
    return run_dir


def copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def resume(run_dir: Path) -> Trainer:
    return Trainer(load_config(RECIPE, overrides(run_dir, "train.max_steps=8")), resume=True)


def fake_checkpoint(run_dir: Path, name: str, marker: bool) -> Path:
    """A copy of step 4's files under a later name, with or without the completion marker."""
    src = run_dir / "checkpoints/step_00000004"
    dest = run_dir / "checkpoints" / name
    shutil.copytree(src, dest)
    if not marker:
        (dest / ckpt.MARKER).unlink()
    return dest


def test_staging_dir_and_unmarked_step_are_never_loaded(tmp_path, trained):
    run_dir = copy_run(trained, tmp_path / "run")
    fake_checkpoint(run_dir, ".tmp-step_00000006", marker=True)  # mid-publish: even with a marker
    unmarked = fake_checkpoint(run_dir, "step_00000008", marker=False)
    (unmarked / "model.pt").write_bytes(b"")  # what a crash mid-write leaves
    trainer = resume(run_dir)
    assert trainer.step == 4
    trainer.fit()
    assert metrics(run_dir)[-1]["step"] == 8
    assert ckpt.latest_checkpoint(run_dir).name == "step_00000008"
    assert (ckpt.latest_checkpoint(run_dir) / ckpt.MARKER).is_file()


@pytest.mark.parametrize("damaged", ["trainer.pt", "model.pt", "optimizer.pt"])
def test_truncated_file_in_a_marked_checkpoint_fails_naming_it(tmp_path, trained, damaged):
    run_dir = copy_run(trained, tmp_path / "run")
    bad = fake_checkpoint(run_dir, "step_00000006", marker=True)
    data = (bad / damaged).read_bytes()
    (bad / damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=str(bad / damaged)):
        resume(run_dir)
