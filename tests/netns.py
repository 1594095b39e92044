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
from dataclasses import dataclass
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
) -> subprocess.Popen:
    """launchers/torchrun.sh inside `host` as node `node_rank` of `nnodes`, the c10d rendezvous
    on `master`'s address, gloo told to use the host's interface. `args`: recipe and overrides.
    The returned process is the torchrun agent itself (`ip netns exec` and the script exec it)."""
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
    cmd = host.exec("bash", str(REPO / "launchers/torchrun.sh"), *args)
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group per agent, to kill if a test fails
    )


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


@dataclass
class Fault:
    """What a cut cable did to a run."""

    cut_at_step: int
    """The last step rank 0 had logged when the cable was pulled."""
    detect_s: float
    """Seconds from the cut until the first worker died (its collective timed out)."""
    resumed_step: int
    """The checkpoint step the restarted group resumed from."""
    total_s: float
    """Seconds from the first launch until every agent had exited."""
    outputs: list[str]
    """Each agent's output."""

    @property
    def steps_lost(self) -> int:
        """Steps done before the cut that had to be done again."""
        return self.cut_at_step - self.resumed_step


def cut_mid_run(
    nodes: list[Host],
    victim: Host,
    run_dir: Path,
    args: list[str],
    after_step: int,
    timeout: float = 600,
) -> Fault:
    """Run a job with one worker per host and one torchrun restart allowed; once a complete
    checkpoint exists and `after_step` is logged, pull `victim`'s cable, plug it back in as soon
    as a worker has died, and let torchrun restart the group and resume."""
    from mtp_dist import checkpoint as ckpt

    start = time.monotonic()
    procs = [torchrun_on(h, nodes[0], i, len(nodes), args, restarts=1) for i, h in enumerate(nodes)]
    try:
        deadline = start + timeout
        while True:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the run ended or stalled before the cable could be cut")
            logged = read_metrics(run_dir)
            if logged and logged[-1]["step"] >= after_step and ckpt.latest_checkpoint(run_dir):
                pids = set().union(*(workers(p) for p in procs))
                if len(pids) == len(nodes):
                    break
            time.sleep(0.02)
        victim.cut()
        cut = time.monotonic()
        cut_at_step = read_metrics(run_dir)[-1]["step"]
        try:
            while all(alive(pid) for pid in pids):
                if time.monotonic() > deadline:
                    raise RuntimeError("no worker died after the cut: the job hangs")
                time.sleep(0.05)
            detect_s = time.monotonic() - cut
        finally:
            victim.heal()
        outs = wait_all(procs, deadline - time.monotonic())
    except BaseException:
        kill(procs)
        raise
    for proc, out in zip(procs, outs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"an agent exited {proc.returncode}:\n{out[-4000:]}")
    # The restarted rendezvous may number the nodes afresh: rank 0 can be on any host now.
    resumed = re.search(r"resumed from \S+ at step (\d+)", "".join(outs))
    if not resumed:
        raise RuntimeError(f"rank 0 never resumed:\n{outs[0][-4000:]}")
    return Fault(cut_at_step, detect_s, int(resumed.group(1)), time.monotonic() - start, outs)
