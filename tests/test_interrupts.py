"""Ctrl-C, with real signals sent to real `mtp` processes, the way a terminal sends it: SIGINT to
every process of the foreground group (here: a new session's), workers included.

1. During training: the step in progress finishes, a checkpoint is written, the process exits
   130 with one line and no traceback; `--resume` continues from that step, each step logged
   once. A second Ctrl-C quits at once, without the checkpoint.
2. During the data build (`mtp data build`, and `mtp train`'s own build): the pool workers stop
   quietly, no shard is left behind (only a complete build has any), one line, exit 130.

Every wait is bounded; a test that fails kills its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from mtp_dist import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = [
    "data.tokenizer=bytes",
    "data.seq_len=32",
    "data.val_fraction=0",
    "model.d_model=32",
    "model.n_layers=3",
    "model.n_attn_heads=2",
    "model.n_future=2",
    "model.max_seq_len=64",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.log_every=1",
    "train.max_steps=100000",  # runs until the signal
    "train.ckpt_every=100000",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted((STDLIB / "json").glob("*.py")):
        (root / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return root


class Mtp:
    """`mtp ARGS` in a session of its own, its output in files (read while it runs)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mtp_dist.cli", *args],
                cwd=REPO,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {what}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout} s:\n{self.stderr()[-3000:]}")
            time.sleep(0.005)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after Ctrl-C:\n{self.stderr()[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def clean_exit(err: str, last: str) -> None:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == last, err[-3000:]


def test_ctrl_c_in_training_checkpoints_then_resume_continues(tmp_path, corpus):
    run = tmp_path / "run"
    # One DataLoader worker: it is in the process group too, and gets the SIGINT as well.
    args = ["train", *TINY, f"data.source={corpus}", f"run_dir={run}", "data.num_workers=1"]
    mtp = Mtp(tmp_path, *args)
    mtp.wait_for(lambda: len(steps(run)) >= 5, "step 5")
    mtp.ctrl_c()
    assert mtp.finish() == 130
    reached = steps(run)[-1]
    assert steps(run) == list(range(1, reached + 1))
    assert ckpt.latest_checkpoint(run).name == f"step_{reached:08d}"  # no checkpoint was due
    clean_exit(
        mtp.stderr(), f"mtp train: interrupted at step {reached} (checkpointed; --resume continues)"
    )
    assert f"stop requested: checkpointed step {reached}" in mtp.out.read_text()

    more = f"train.max_steps={reached + 2}"
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.cli", *args, more, "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{reached:08d}'} at step {reached}" in (
        proc.stdout
    )
    assert f"train.max_steps: 100000 -> {reached + 2}" in proc.stdout
    assert steps(run) == list(range(1, reached + 3))


def test_a_second_ctrl_c_quits_at_once(tmp_path, corpus):
    """Steps of ~1-2 s: the second Ctrl-C, sent as soon as the first is acknowledged, lands in
    the step the first one let finish; no checkpoint is written, none is left half-written."""
    run = tmp_path / "run"
    big = ["model.d_model=256", "model.n_layers=6", "model.n_attn_heads=4", "data.seq_len=256",
           "model.max_seq_len=256", "train.micro_batch_size=8",
           "train.grad_accum_steps=2"]  # fmt: skip
    mtp = Mtp(tmp_path, "train", *TINY, *big, f"data.source={corpus}", f"run_dir={run}")
    mtp.wait_for(lambda: len(steps(run)) >= 1, "step 1")
    mtp.ctrl_c()
    mtp.wait_for(lambda: "Ctrl-C: stopping after this step" in mtp.stderr(), "the first stop")
    mtp.ctrl_c()
    assert mtp.finish() == 130
    clean_exit(mtp.stderr(), "mtp train: interrupted")
    assert ckpt.latest_checkpoint(run) is None and not list(run.glob("checkpoints/.tmp-*"))


def _stops_mid_build(mtp: Mtp, timeout: float = 120) -> None:
    """Ctrl-C once the build is under way (its progress bar counts files)."""
    mtp.wait_for(lambda: "files=" in mtp.stderr(), "the data build", timeout)
    time.sleep(1.0)  # shards being written
    mtp.ctrl_c()
    assert mtp.finish() == 130


def _shards(directory: Path) -> list[str]:
    """What a build publishes: shards and the manifest."""
    return sorted(p.name for p in [*directory.glob("*.tar"), *directory.glob("manifest.json")])


# The interpreter's whole library directory (installed packages included where they live under
# it): seconds of building at the least, so Ctrl-C lands mid-build.
BIG = str(STDLIB)


def test_ctrl_c_in_data_build_leaves_no_shard(tmp_path):
    out = tmp_path / "data"
    args = ["data", "build", BIG, "--out", str(out), "--bytes", "--seq-len", "32",
            "--n-future", "2", "--workers", "2", "--shard-mb", "1"]  # fmt: skip
    mtp = Mtp(tmp_path, *args)
    _stops_mid_build(mtp)
    clean_exit(mtp.stderr(), "mtp data build: interrupted")
    assert _shards(out) == []


def test_ctrl_c_in_trains_data_build_keeps_nothing_half_made(tmp_path):
    run = tmp_path / "run"
    mtp = Mtp(tmp_path, "train", *TINY, f"data.source={BIG}", f"run_dir={run}")
    _stops_mid_build(mtp)
    clean_exit(mtp.stderr(), "mtp train: interrupted")
    assert not run.exists()  # nothing was complete: no shard, no empty directory
