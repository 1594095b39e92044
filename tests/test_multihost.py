"""Several hosts for real, and a network that fails.

Two hosts, each a network namespace of its own with one interface (tests/netns.py), one
launchers/torchrun.sh per host, the c10d rendezvous on host 0's interface address (10.77.0.1),
gloo told which interface to use (GLOO_SOCKET_IFNAME), one worker per host: data parallel 2.

1. The two-host run logs the same losses, step by step, as one host running the same global
   layout (two workers on one machine, loopback).
2. The cable cut is real: with host 1's bridge port down, host 0 cannot reach it.
3. A pulled cable mid-run (`netns.cut_mid_run`): the job fails within `parallel.timeout_s` +
   DETECT_MARGIN_S rather than hang, torchrun restarts it, it resumes from the last complete
   checkpoint (found in the restarted attempt's worker logs, whichever host rank 0 is on), at
   most a checkpoint interval of steps is done twice, and every step's loss equals the
   unbroken one-host run's. Numbers: bench/faults.py, docs/benchmarks.md ("A network that
   fails").

Needs root for the namespaces (CI runs as root). Without it these tests FAIL, saying so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/netns.py, from bench/ too
import netns  # noqa: E402

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "tests/slurm/tiny.yaml"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"
STEPS = 40  # ~4 s of training: room to cut after the first checkpoint and before the end
# parallel.timeout_s. It also bounds process-group setup, where one host's workers may still be
# importing torch while the other's wait: seconds apart on a loaded 2-core machine.
TIMEOUT_S = 20
CKPT_EVERY = 2  # tests/slurm/tiny.yaml's train.ckpt_every
# How far past TIMEOUT_S the first worker may die after the cut: the gloo timeout counts from
# the start of the collective, then the worker unwinds and exits, and the watcher polls, all on
# a loaded 2-core machine. bench/faults.py states the same bound.
DETECT_MARGIN_S = 15


def job_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(RECIPE),
        f"run_dir={run_dir}",
        f"data.source={CORPUS}",
        "tracking.enabled=false",
        f"train.max_steps={STEPS}",
        f"parallel.timeout_s={TIMEOUT_S}",
        *extra,
    ]


@pytest.fixture(scope="module")
def hosts():
    try:
        with netns.hosts(2) as made:
            yield made
    except netns.NetnsError as e:
        pytest.fail(f"cannot make the hosts: {e}")


@pytest.fixture(scope="module")
def one_host(tmp_path_factory) -> list[dict]:
    """The reference: the same global layout (2 data-parallel workers) on one host, loopback."""
    run_dir = tmp_path_factory.mktemp("one_host") / "run"
    env = {k: v for k, v in os.environ.items() if k not in netns.DROPPED}
    env |= {"NPROC_PER_NODE": "2", "MAX_RESTARTS": "0", "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "launchers/torchrun.sh"), *job_args(run_dir)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        (out,) = netns.wait_all([proc], timeout=400)
    except TimeoutError as e:
        pytest.fail(str(e))
    assert proc.returncode == 0, out[-4000:]
    got = netns.read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    return got


def same_losses(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["head_losses"] == pytest.approx(b["head_losses"], abs=1e-6), a["step"]


def test_two_hosts_match_one_host(tmp_path, hosts, one_host):
    run_dir = tmp_path / "run"
    procs = [netns.torchrun_on(h, hosts[0], i, 2, job_args(run_dir)) for i, h in enumerate(hosts)]
    try:
        outs = netns.wait_all(procs, timeout=400)
    except TimeoutError as e:
        pytest.fail(str(e))
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    # The rendezvous and the process group ran over the hosts' own addresses.
    assert f"--rdzv-endpoint {hosts[0].addr}:{netns.PORT}" in outs[1]
    assert f"--local-addr {hosts[1].addr}" in outs[1]
    same_losses(netns.read_metrics(run_dir), one_host)


def test_pulled_cable_fails_in_time_restarts_and_resumes(tmp_path, hosts, one_host):
    run_dir = tmp_path / "run"
    try:
        fault = netns.cut_mid_run(
            hosts, hosts[1], run_dir, job_args(run_dir), after_step=6, hold_s=TIMEOUT_S
        )
    except (RuntimeError, TimeoutError) as e:  # it says what did not happen
        pytest.fail(str(e))
    print(fault)
    # Failed by the collective timeout (not before it: that would be some other death), not
    # hung past it.
    assert TIMEOUT_S - 2 <= fault.detect_s <= TIMEOUT_S + DETECT_MARGIN_S, fault.detect_s
    assert fault.attempts == 2  # one restart
    # The cut landed mid-run, and the restart resumed from the latest complete checkpoint.
    assert fault.cut_at_step < STEPS
    assert fault.resumed_step == fault.checkpoint_at_failure > 0
    assert 0 <= fault.steps_lost <= CKPT_EVERY
    # Nothing lost: every step once, with the loss of a run that never broke.
    same_losses(netns.read_metrics(run_dir), one_host)


def test_hosts_cannot_reach_each_other_with_the_cable_cut(hosts):
    """The fault is real: with host 1's port down, host 0 cannot connect to it."""
    a, b = hosts
    server = "import socket,time; s=socket.create_server(('{addr}', 5555)); time.sleep(30)"
    client = "import socket; socket.create_connection(('{addr}', 5555), timeout=2)"
    srv = subprocess.Popen(b.exec(sys.executable, "-c", server.format(addr=b.addr)))
    try:
        reach = [sys.executable, "-c", client.format(addr=b.addr)]
        for _ in range(50):  # the server needs a moment to listen
            if subprocess.run(a.exec(*reach), capture_output=True).returncode == 0:
                break
        else:
            pytest.fail("host 0 never reached host 1's server")
        b.cut()
        try:
            assert subprocess.run(a.exec(*reach), capture_output=True).returncode != 0
        finally:
            b.heal()
        assert subprocess.run(a.exec(*reach), capture_output=True).returncode == 0
    finally:
        os.kill(srv.pid, signal.SIGKILL)
        srv.wait()
