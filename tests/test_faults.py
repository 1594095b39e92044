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
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from mtp_dist import checkpoint as ckpt
from mtp_dist.config import load_config
from mtp_dist.training import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "tests/slurm/tiny.yaml"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def overrides(run_dir: Path, *extra: str, tracking: bool = False) -> list[str]:
    return [f"run_dir={run_dir}", f"data.source={CORPUS}", f"tracking.enabled={tracking}", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- 1. kill -9 of a rank, torchrun restart, exact resume ---------------------------------------


def launch(run_dir: Path, *extra: str, restarts: int = 1, tracking=False) -> subprocess.Popen:
    env = {
        **os.environ,
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": str(restarts),
        "PYTHON": sys.executable,
    }
    for var in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    over = overrides(run_dir, *extra, tracking=tracking)
    cmd = ["bash", str(REPO / "launchers/torchrun.sh"), str(RECIPE), *over]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group to clean up if the test fails
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def workers(agent_pid: int) -> dict:
    """{RANK: psutil.Process} of the torchrun agent's worker processes."""
    import psutil

    found = {}
    for child in psutil.Process(agent_pid).children():
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def kill_rank_mid_run(proc: subprocess.Popen, run_dir: Path, rank: int, after_step: int) -> int:
    """SIGKILL worker `rank` once a complete checkpoint exists and `after_step` is logged.

    Returns the last step rank 0 logged before the group went down."""
    import psutil

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the fault could be injected"
        logged = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if ckpt.latest_checkpoint(run_dir) and logged and logged[-1]["step"] >= after_step:
            group = workers(proc.pid)
            if rank in group:
                group[rank].send_signal(signal.SIGKILL)
                # The survivors fail at their next collective; the restarted group needs many
                # seconds to start, so the file now ends with the killed attempt's last step.
                psutil.wait_procs(list(group.values()), timeout=60)
                return metrics(run_dir)[-1]["step"]
        time.sleep(0.02)
    pytest.fail("no checkpoint and no progress within 120 s")


STEPS = 24  # ~2 s of training at 2 processes: room to kill after step 5 and before the end


@pytest.mark.distributed
def test_kill_one_rank_restarts_and_matches_uninterrupted_run(tmp_path):
    """Rank 0 is the one killed: it also writes the metrics and publishes the checkpoints.

    The uninterrupted reference run doubles as the launcher's first-attempt check: torchrun.sh
    always passes --resume, which must start a fresh run_dir from step 0; and only rank 0 tracks.
    """
    steps = f"train.max_steps={STEPS}"
    reference = tmp_path / "reference"
    out = finish(launch(reference, steps, restarts=0, tracking=True))
    assert "resumed from" not in out
    expected = metrics(reference)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_s"] > 0 for r in expected)
    check_one_mlflow_run(reference, STEPS)

    faulted = tmp_path / "faulted"
    proc = launch(faulted, steps)
    killed_at = kill_rank_mid_run(proc, faulted, rank=0, after_step=5)
    out = finish(proc)

    resumed = re.search(r"resumed from (\S+) at step (\d+)", out)
    assert resumed, out[-4000:]
    resumed_step = int(resumed.group(2))
    assert Path(resumed.group(1)).name == f"step_{resumed_step:08d}"
    assert 2 <= resumed_step <= killed_at < STEPS, (resumed_step, killed_at)
    got = metrics(faulted)
    # The restarted attempt dropped the killed attempt's lines past the checkpoint and ran those
    # steps again: every step once, each loss equal to the uninterrupted run's.
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), step
        assert a["head_losses"] == pytest.approx(b["head_losses"], abs=1e-6), step
    assert ckpt.latest_checkpoint(faulted).name == f"step_{STEPS:08d}"


def check_one_mlflow_run(run_dir: Path, steps: int) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "only rank 0 may log"
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train/tokens_per_s")
    assert [m.step for m in history] == list(range(1, steps + 1))  # log_every=1


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
