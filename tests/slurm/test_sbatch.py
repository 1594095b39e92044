"""The real Slurm tier: launchers/slurm.sbatch on a local cluster (2 simulated nodes).

Needs `bash scripts/slurm_cluster.sh start` first (as root); run with `pytest -m slurm`.
Without a running cluster every test here FAILS with that instruction (never skips).

1. A 2-node x 2-process tiny run of the project's own sbatch script: job COMPLETED, losses finite
   and decreasing, a complete final checkpoint written by 4 data-parallel ranks, one MLflow run
   (rank 0 only) in the sqlite store named by MLFLOW_TRACKING_URI.
2. Requeue: SIGUSR1 to the batch script (what --signal=B:USR1@120 sends before the time limit)
   -> the workers checkpoint and exit -> the script requeues the job -> the job starts again,
   resumes from that checkpoint and finishes; the MLflow run is continued, not duplicated.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "tests/slurm/tiny.yaml"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"
START_HINT = "start the local cluster first: `bash scripts/slurm_cluster.sh start` (as root)"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def slurm(*cmd: str) -> str:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.fail(f"{cmd[0]} not found: Slurm is not installed; {START_HINT}")
    if run.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` failed: {run.stderr.strip()}; {START_HINT}")
    return run.stdout


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    states = slurm("sinfo", "-h", "-N", "-o", "%N %T").split("\n")
    idle = [line for line in states if line.endswith(" idle")]
    if len(idle) < 2:
        pytest.fail(f"need 2 idle nodes, sinfo says {states}; {START_HINT}")


def job_info(job_id: str) -> dict[str, str]:
    line = slurm("scontrol", "-o", "show", "job", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", line))


def submit(tmp_path: Path, *overrides: str, name: str) -> str:
    env = {
        **os.environ,
        "MTP_REPO_DIR": str(REPO),
        "RUN_DIR": str(tmp_path / "run"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'tracking.db'}",
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": "0",
        "PYTHON": sys.executable,
    }
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        "--gpus-per-node=0",  # a CPU cluster: no GRES
        "--cpus-per-task=2",
        "--time=00:15:00",
        f"--output={tmp_path}/%x-%j.out",
        f"--error={tmp_path}/%x-%j.err",
        str(REPO / "launchers/slurm.sbatch"),
        str(RECIPE),
        f"data.source={CORPUS}",
        *overrides,
    ]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().split(";")[0]


def logs(tmp_path: Path, name: str, job_id: str) -> str:
    parts = []
    for ext in ("out", "err"):
        path = tmp_path / f"{name}-{job_id}.{ext}"
        parts.append(path.read_text() if path.is_file() else f"(no {path.name})")
    return "\n".join(parts)


def wait_for(job_id: str, tmp_path: Path, name: str, timeout: float = 360) -> dict[str, str]:
    """Poll scontrol (accounting is off: no sacct; `sbatch --wait` polls slowly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} not done in {timeout} s:\n{logs(tmp_path, name, job_id)[-5000:]}")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mlflow_runs(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'tracking.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


def check_finished_run(tmp_path: Path, steps: int, out: str) -> None:
    """The checks every finished job gets: the run, its checkpoint and its one MLflow run."""
    assert "on node1 node2, rendezvous 127.0.0.1:" in out  # NodeAddr, not the node name
    run_dir = tmp_path / "run"
    got = records(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # none lost, none repeated
    losses = [r["loss"] for r in got]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    marker = json.loads((run_dir / f"checkpoints/step_{steps:08d}/complete.json").read_text())
    assert marker["dp_size"] == 4  # 2 nodes x 2 workers, all data parallel

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1, "only rank 0 may log, and a requeued job continues its run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))
    assert history[-1].value == pytest.approx(losses[-1])
    assert run.data.metrics["train/tokens_per_s"] > 0
    assert not (run_dir / "mlflow.db").exists()  # MLFLOW_TRACKING_URI was honoured


def test_two_nodes_two_processes_each(tmp_path):
    name, steps = "mtp-slurm-2x2", 20
    started = time.monotonic()
    job_id = submit(tmp_path, f"train.max_steps={steps}", "train.ckpt_every=10", name=name)
    info = wait_for(job_id, tmp_path, name)
    print(f"job {job_id}: {info['JobState']} after {time.monotonic() - started:.0f} s")
    out = logs(tmp_path, name, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-5000:]
    check_finished_run(tmp_path, steps, out)


def test_usr1_checkpoints_requeues_and_resumes(tmp_path):
    name = "mtp-slurm-requeue"
    steps = 60  # ~10 s of training: the signal lands within the first checkpoints
    started = time.monotonic()
    job_id = submit(tmp_path, f"train.max_steps={steps}", "train.ckpt_every=5", name=name)
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step_*/complete.json")):
        info = job_info(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), logs(tmp_path, name, job_id)[-5000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    slurm("scancel", "--batch", "--signal=USR1", job_id)  # as --signal=B:USR1@120 would

    deadline = time.monotonic() + 120
    while job_info(job_id).get("Restarts") == "0":
        assert time.monotonic() < deadline, logs(tmp_path, name, job_id)[-5000:]
        time.sleep(0.5)
    stopped_at = records(run_dir)[-1]["step"]
    assert stopped_at < steps, "the run finished before the signal: make it longer"
    # A requeued job waits AuthInfo=cred_expire (10 s on the local cluster, 120 s by default).
    info = wait_for(job_id, tmp_path, name)
    print(f"job {job_id}: {info['JobState']} after {time.monotonic() - started:.0f} s")
    out = logs(tmp_path, name, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert "requeueing job" in out and "start 2 on node1 node2" in out, out[-5000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed.group(1)) == stopped_at, out[-5000:]
    check_finished_run(tmp_path, steps, out)
