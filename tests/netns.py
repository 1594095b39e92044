"""Hosts of their own on one machine: Linux network namespaces joined by a bridge.

    with netns.hosts(2) as (a, b):          # a.addr == "10.77.0.1", b.addr == "10.77.0.2"
        subprocess.run(a.exec("ping", "-c1", b.addr), check=True)
        b.cut()                              # b's cable is pulled: its switch port goes down
        b.heal()

Each host is a namespace with a veth interface (`host.dev`) holding `host.addr`/24 and its own
loopback. The other ends of the veths join a bridge in one more namespace, so the hosts reach
each other and nothing else: the machine's own interfaces and routes are untouched. A fault is
a pulled cable: `cut()` takes the host's port on the bridge down, so frames to and from it are
dropped without a reset or an error, and only timeouts can notice. (`tc netem` loss or delay
would be the finer tool, but this machine's kernel has no netem qdisc.) Names carry
the test process's pid, so runs side by side do not collide. Everything made is removed on exit,
also when setting up fails halfway.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip`: when these are missing, `hosts()`
raises NetnsError saying so, and a test using it fails (it is never skipped).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"


class NetnsError(RuntimeError):
    """Namespaces could not be set up (not root, no `ip`, ...): the message says what failed."""


def sh(*cmd: str) -> None:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise NetnsError(f"{cmd[0]} not found: install iproute2 (`ip`, `tc`)") from e
    if run.returncode != 0:
        raise NetnsError(
            f"`{' '.join(cmd)}` failed: {run.stderr.strip()} — network namespaces need root "
            "(CAP_SYS_ADMIN, CAP_NET_ADMIN); CI runs the suite as root"
        )


@dataclass(frozen=True)
class Host:
    switch: str
    """The namespace of the bridge this host is cabled to."""
    port: str
    """This host's port on that bridge (in `switch`)."""
    ns: str
    """The namespace's name (`ip netns exec NS ...`)."""
    dev: str
    """Its interface to the other hosts: what GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name."""
    addr: str
    """Its address on that interface."""

    def exec(self, *cmd: str) -> list[str]:
        """`cmd` as a command line that runs inside this host."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def cut(self) -> None:
        """Pull the cable: this host's bridge port goes down. Its TCP connections stay open, so
        peers and the host itself see silence, not an error."""
        sh("ip", "netns", "exec", self.switch, "ip", "link", "set", self.port, "down")

    def heal(self) -> None:
        """Plug it back in: connections that have not timed out carry on."""
        sh("ip", "netns", "exec", self.switch, "ip", "link", "set", self.port, "up")


@contextlib.contextmanager
def hosts(n: int = 2, tag: str | None = None) -> Iterator[list[Host]]:
    """`n` hosts (2 <= n <= 9) at 10.77.0.1, 10.77.0.2, ..., removed on exit."""
    if not 2 <= n <= 9:
        raise ValueError(f"2 to 9 hosts, not {n}")
    if shutil.which("ip") is None:
        raise NetnsError("ip not found: install iproute2")
    tag = tag or str(os.getpid())
    switch = f"mtp{tag}-sw"
    made: list[str] = []  # namespaces, deleted in reverse; their interfaces go with them
    try:
        sh("ip", "netns", "add", switch)
        made.append(switch)
        sw = ["ip", "netns", "exec", switch]
        sh(*sw, "ip", "link", "add", "br0", "type", "bridge")
        sh(*sw, "ip", "link", "set", "br0", "up")
        out = []
        for i in range(n):
            # Interface names are limited to 15 characters, so they stay short and per-namespace
            # (each namespace has its own name space for links); the peer end starts in the switch.
            host = Host(
                switch=switch,
                port=f"port{i}",
                ns=f"mtp{tag}-h{i}",
                dev="eth0",
                addr=f"{SUBNET}.{i + 1}",
            )
            sh("ip", "netns", "add", host.ns)
            made.append(host.ns)
            sh(*sw, "ip", "link", "add", host.port, "type", "veth", "peer", "name", host.dev)
            sh(*sw, "ip", "link", "set", host.dev, "netns", host.ns)
            sh(*sw, "ip", "link", "set", host.port, "master", "br0", "up")
            sh(*host.exec("ip", "addr", "add", f"{host.addr}/24", "dev", host.dev))
            sh(*host.exec("ip", "link", "set", host.dev, "up"))
            sh(*host.exec("ip", "link", "set", "lo", "up"))
            out.append(host)
        yield out
    finally:
        for ns in reversed(made):
            # A process still running inside keeps a namespace's interfaces alive, not its name;
            # the callers kill their processes first.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- a job across the hosts ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
PORT = 29500  # every host has a port space of its own: no clash with other jobs on the machine


def torchrun_on(
    host: Host,
    master: Host,
    node_rank: int,
    nnodes: int,
    args: list[str],
    nproc: int = 1,
    restarts: int = 0,
    output: Path | None = None,
    log_dir: Path | None = None,
) -> subprocess.Popen:
    """launchers/torchrun.sh inside `host` as node `node_rank` of `nnodes`, the c10d rendezvous
    on `master`'s address, gloo told to use the host's interface. `args`: recipe and overrides.
    The returned process is the torchrun agent itself (`ip netns exec` and the script exec it).

    `output`: a file for the agent's output (stdout and stderr); without it, a pipe the caller
    must keep reading (`wait_all`), or the workers block once it is full. `log_dir`: torchrun's
    `--log-dir` with `--tee 3`, so every attempt's workers leave their own stdout.log and
    stderr.log under LOG_DIR/<run id>/attempt_N/<local rank>/ (`worker_logs`)."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in DROPPED},
        "NNODES": str(nnodes),
        "NODE_RANK": str(node_rank),
        "NPROC_PER_NODE": str(nproc),
        "MASTER_ADDR": master.addr,
        "MASTER_PORT": str(PORT),
        "LOCAL_ADDR": host.addr,
        "GLOO_SOCKET_IFNAME": host.dev,
        "MAX_RESTARTS": str(restarts),
        "PYTHON": sys.executable,
        # torchrun sets 1 thread per worker only with several workers per node. These hosts
        # share the machine's cores, and OpenMP threads spinning in each host's worker slowed
        # every step ~50x here, so both layouts get what the one-host reference gets.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if log_dir is not None:
        env["TORCHRUN_ARGS"] = f"--log-dir {log_dir} --tee 3"
    cmd = host.exec("bash", str(REPO / "launchers/torchrun.sh"), *args)
    with contextlib.ExitStack() as files:
        out = files.enter_context(output.open("w")) if output is not None else subprocess.PIPE
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one process group per agent, to kill if a test fails
        )


def worker_logs(log_dir: Path) -> dict[int, list[str]]:
    """The workers' stdout under a torchrun `--log-dir` (`torchrun_on(log_dir=...)`): for each
    attempt (0 = the first launch, 1 = the first restart, ...), one text per worker."""
    found: dict[int, list[str]] = {}
    for path in sorted(log_dir.glob("*/attempt_*/*/stdout.log")):
        attempt = int(path.parent.parent.name.removeprefix("attempt_"))
        found.setdefault(attempt, []).append(path.read_text(errors="replace"))
    return found


# The launch environment of whoever runs this (a torchrun or Slurm job) must not leak in.
DROPPED = {"MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "WORLD_SIZE", "RANK"}
DROPPED |= {"LOCAL_RANK", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME", "SLURM_NODEID", "SLURM_JOB_ID"}


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the agents and every process under them. torchrun starts each worker in a
    session of its own, so killing the agent's process group would leave the workers running
    (and holding the agent's output pipe open)."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once all have exited; kills them all past `timeout` seconds and
    raises TimeoutError with the tails of their output."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        kill(procs)
        raise TimeoutError(f"the job did not end within {timeout} s") from None
    return outs


def workers(agent: subprocess.Popen) -> set[int]:
    """PIDs of the torchrun agent's workers (its `mtp_dist.cli` children carrying RANK)."""
    import psutil

    found = set()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(agent.pid).children():
            with contextlib.suppress(psutil.Error):
                # Only the trainer processes: a short-lived helper the agent starts also
                # inherits its environment, and counting it made its exit look like a death.
                if "RANK" in child.environ() and "mtp_dist.cli" in child.cmdline():
                    found.add(child.pid)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (an exited child its agent has not reaped yet does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # the last may be partial


def last_logged(run_dir: Path) -> int:
    """The last step metrics.jsonl holds (0 before the first)."""
    logged = read_metrics(run_dir)
    return logged[-1]["step"] if logged else 0


def last_checkpoint(run_dir: Path) -> int | None:
    """The step of the run's latest complete checkpoint (the one `--resume` takes), or None.
    From mtp_dist.checkpoint.layout, which imports no torch: torch's import took ~9 s on the
    loaded test machine, long enough for the whole run to finish between "a checkpoint
    exists" and the cut."""
    from mtp_dist.checkpoint.layout import complete_checkpoints

    found = complete_checkpoints(run_dir)
    return int(found[-1].name.removeprefix("step_")) if found else None


RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


@dataclass
class Fault:
    """What a cut cable did to a run."""

    cut_at_step: int
    """The last step metrics.jsonl held when the cable was pulled."""
    failed_at_step: int
    """The last step it held when the first worker died: what the failed attempt had done."""
    checkpoint_at_failure: int
    """The latest complete checkpoint when the first worker died: where a resume must start."""
    detect_s: float
    """Seconds from the cut until the first worker died (its collective timed out)."""
    down_s: float
    """Seconds the port was down."""
    restart_s: float | None
    """Seconds from the cut until the restarted attempt's workers were launched."""
    resumed_step: int
    """The checkpoint step the restarted group resumed from."""
    attempts: int
    """Worker-group attempts torchrun made (1 = no restart)."""
    total_s: float
    """Seconds from the first launch until every agent had exited."""
    outputs: list[str] = field(repr=False)
    """Each agent's output."""

    @property
    def steps_lost(self) -> int:
        """Steps done before the failure that had to be done again."""
        return self.failed_at_step - self.resumed_step


def cut_mid_run(
    nodes: list[Host],
    victim: Host,
    run_dir: Path,
    args: list[str],
    after_step: int,
    hold_s: float,
    logs: Path | None = None,
    timeout: float = 600,
) -> Fault:
    """Run a job with one worker per host and one torchrun restart allowed; once a complete
    checkpoint exists and `after_step` is logged, pull `victim`'s cable; plug it back in once a
    worker has died and at least `hold_s` seconds (pass `parallel.timeout_s`: the failure must
    be the collective timeout, not a blip healed before it) have passed; let torchrun restart
    the group and resume. Raises RuntimeError, saying what happened, unless the job failed,
    was restarted once, resumed from a checkpoint and ended well. `logs` (default: next to
    run_dir) gets each agent's output (agent<i>.log) and torchrun's per-attempt worker logs."""
    logs = logs or run_dir.with_name(run_dir.name + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + timeout
    procs = [
        torchrun_on(
            h,
            nodes[0],
            i,
            len(nodes),
            args,
            restarts=1,
            output=logs / f"agent{i}.log",
            log_dir=logs / f"torchrun{i}",
        )
        for i, h in enumerate(nodes)
    ]

    def outputs() -> list[str]:
        return [(logs / f"agent{i}.log").read_text(errors="replace") for i in range(len(nodes))]

    def attempts() -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for i in range(len(nodes)):
            for attempt, texts in worker_logs(logs / f"torchrun{i}").items():
                found.setdefault(attempt, []).extend(texts)
        return found

    try:
        while True:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the run ended or stalled before the cable could be cut")
            if last_logged(run_dir) >= after_step and last_checkpoint(run_dir) is not None:
                pids = set().union(*(workers(p) for p in procs))
                if len(pids) == len(nodes):
                    break
            time.sleep(0.02)
        victim.cut()
        cut = time.monotonic()
        cut_at_step = last_logged(run_dir)
        try:
            while all(alive(pid) for pid in pids):
                if time.monotonic() > deadline:
                    raise RuntimeError("no worker died after the cut: the job hangs")
                time.sleep(0.05)
            detect_s = time.monotonic() - cut
            # The restarted attempt truncates metrics.jsonl to its checkpoint, but only once its
            # workers have imported torch and loaded it: seconds from now.
            failed_at_step = last_logged(run_dir)
            checkpoint_at_failure = last_checkpoint(run_dir)
            time.sleep(max(0.0, cut + hold_s - time.monotonic()))
        finally:
            victim.heal()
            down_s = time.monotonic() - cut
        restart_s = None
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job did not end within {timeout} s")
            if restart_s is None and any(
                (logs / f"torchrun{i}").glob("*/attempt_1") for i in range(len(nodes))
            ):
                restart_s = time.monotonic() - cut
            time.sleep(0.1)
    except BaseException:
        kill(procs)
        raise
    total_s = time.monotonic() - start
    outs = outputs()
    for proc, out in zip(procs, outs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"an agent exited {proc.returncode}:\n{out[-4000:]}")
    runs = attempts()
    if len(runs) < 2:
        raise RuntimeError(
            f"torchrun never restarted (cut at step {cut_at_step}, a worker gone "
            f"{detect_s:.1f} s later at step {failed_at_step}): the job was not interrupted"
        )
    # The restarted rendezvous may number the nodes afresh: rank 0 can be on any host now.
    resumed = [m for text in runs[max(runs)] for m in RESUMED.finditer(text)]
    if len(resumed) != 1:
        raise RuntimeError(f"{len(resumed)} 'resumed from' lines in the last attempt's workers")
    if any(RESUMED.search(text) for text in runs[0]):
        raise RuntimeError("the first attempt resumed: run_dir was not new")
    return Fault(
        cut_at_step=cut_at_step,
        failed_at_step=failed_at_step,
        checkpoint_at_failure=checkpoint_at_failure,
        detect_s=detect_s,
        down_s=down_s,
        restart_s=restart_s,
        resumed_step=int(resumed[0].group(2)),
        attempts=len(runs),
        total_s=total_s,
        outputs=outs,
    )
