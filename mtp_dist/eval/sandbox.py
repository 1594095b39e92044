"""Running untrusted generated code: one process per check, contained, killed whole.

Each `Sandbox.run(program)`:
  * makes a fresh temporary directory (removed afterwards) holding the program and a work
    directory owned by a dedicated uid;
  * starts `unshare --net --pid --mount --fork python -I -S sandbox_runner.py` in a new session:
    an empty network namespace (no network at all), a PID namespace (when its first process
    dies the kernel kills every process in it), and a private mount namespace in which the
    runner covers every world-writable directory with the work directory, sets resource
    limits (memory, CPU, processes, file size, open files) and drops to the dedicated uid;
  * waits up to the wall-clock timeout, then SIGKILLs every process whose real uid is the
    check's (code that called setsid() has left the process group, but not its uid), and the
    process group.

The uid is unused by the system and private to one concurrent check (a pool per Sandbox), so
RLIMIT_NPROC (counted per uid) caps a fork bomb without touching other checks, and the code
cannot signal, read or write anything but its own directory and world-readable files.

The verdict. The program runs in the runner's interpreter, so whatever the runner can do once
the program has finished, the program could have done itself (exit with any status, write to
any descriptor it holds: b"ok" on an inherited pipe used to be a forged pass). So a pass is a
secret, not an act: a fresh random token per check (TOKEN_BYTES), handed to the runner on its
stdin (never argv or the environment, which the program can read), which the runner reads and
replaces with /dev/null before the program runs, also closing every other descriptor but the
result pipe. Passed means: exit status 0 and exactly the token back on the result pipe, which
the runner writes only after the program ran to its end. Exiting early, writing to descriptors,
or guessing (2^-128) fail. What remains: code that deliberately searches the runner's memory
(its frames through sys._getframe or gc, or raw memory through ctypes) finds the token and can
forge a pass. No design with the tests in the same process as the code can close that, as any
proof of completion the runner can give, the code can give; a pass is therefore "the program
ran to its end or deliberately attacked the evaluator", and it is the namespaces, the uid and
the limits that contain such code, not the verdict.

Without root (a developer machine) none of that is possible: the sandbox then still uses a
separate process group, the limits and `unshare` without user switching if the kernel allows it,
else an in-process socket guard, and says so in `Sandbox.isolation`. CI and the tests run as root.
"""

from __future__ import annotations

import os
import pwd
import queue
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("sandbox_runner.py")
TOKEN_BYTES = 16
"""Size of the per-check secret whose return on the result pipe is the only way to pass."""
_NAMESPACES = ["--net", "--pid", "--fork"]


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    """Wall-clock seconds before the whole check is killed."""
    memory_mb: int = 1024
    """Address-space limit per process (RLIMIT_AS)."""
    max_processes: int = 16
    """Processes of the check's uid (RLIMIT_NPROC): what stops a fork bomb."""
    max_file_mb: int = 16
    """Largest file the check may write (RLIMIT_FSIZE)."""
    max_open_files: int = 64
    max_output_kb: int = 8
    """Captured output kept for the report (the tail)."""

    @property
    def cpu_s(self) -> int:
        return int(self.timeout_s) + 1


@dataclass
class CheckResult:
    passed: bool
    status: str
    """'passed', 'failed' (raised or exited early), 'timeout' or 'killed' (by a signal)."""
    detail: str
    """Tail of the check's output (its traceback on failure)."""
    seconds: float


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class Sandbox:
    """Runs Python programs in isolation; thread-safe up to `slots` checks at a time."""

    def __init__(self, limits: Limits | None = None, *, slots: int = 4) -> None:
        self.limits = limits or Limits()
        self.python = os.path.realpath(sys.executable)  # not a shim: a start-up costs ~20 ms
        self.root = os.geteuid() == 0
        unshare = shutil.which("unshare")
        self.prefix: list[str] = []
        if unshare and self.root and _probe([unshare, *_NAMESPACES, "--mount"]):
            self.prefix = [unshare, *_NAMESPACES, "--mount", "--"]
        elif unshare and _probe([unshare, "--user", "--map-root-user", *_NAMESPACES]):
            self.prefix = [unshare, "--user", "--map-root-user", *_NAMESPACES, "--"]
        self.uids: queue.Queue[int | None] = queue.Queue()
        for uid in self._free_uids(slots) if self.root and self.prefix else [None] * slots:
            self.uids.put(uid)
        self.slots = slots
        self.isolation = {
            "network": "namespace" if self.prefix else "socket guard (in-process)",
            "processes": "pid namespace + process group" if self.prefix else "process group",
            "user": "dedicated uid per check" if self.root and self.prefix else "same user",
            "filesystem": (
                "private mounts; writable: own directory only"
                if self.root and self.prefix
                else "unprotected (not root)"
            ),
        }

    @staticmethod
    def _free_uids(count: int) -> list[int]:
        """`count` uids no account uses, from a random block so that two evaluators running at
        the same time are unlikely to share one."""
        while True:
            base = random.Random().randrange(200_000, 2_000_000_000, 1024)
            uids = list(range(base, base + count))
            if not any(_uid_exists(u) for u in uids):
                return uids

    def run(self, program: str) -> CheckResult:
        uid = self.uids.get()
        try:
            return self._run(program, uid)
        finally:
            self.uids.put(uid)

    def run_many(self, programs: Sequence[str], workers: int = 2) -> list[CheckResult]:
        """Checks in parallel (threads waiting on processes), results in input order."""
        workers = max(1, min(workers, self.slots))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.run, programs))

    def _run(self, program: str, uid: int | None) -> CheckResult:
        tmp = Path(tempfile.mkdtemp(prefix="mtp-check-"))
        start = time.monotonic()
        token = secrets.token_bytes(TOKEN_BYTES)
        key_read, key_write = os.pipe()  # the token, waiting for the runner when it starts
        os.write(key_write, token)
        os.close(key_write)
        read_fd, write_fd = os.pipe()
        try:
            tmp.chmod(0o711)  # the uid may pass through to work/, not list or write here
            work, stage = tmp / "work", tmp / "stage"
            work.mkdir(mode=0o700)
            stage.mkdir(mode=0o700)
            if uid is not None:
                os.chown(work, uid, uid)
            (tmp / "program.py").write_text(program)
            config = {
                "workdir": work,
                "stage": stage,
                "program": tmp / "program.py",
                "uid": "none" if uid is None else uid,
                "result_fd": write_fd,
                "guard_network": int(not self.prefix),
                "cpu_s": self.limits.cpu_s,
                **asdict(self.limits),
            }
            args = [f"{key}={value}" for key, value in config.items()]
            cmd = [*self.prefix, self.python, "-I", "-S", str(RUNNER), *args]
            with open(tmp / "output", "wb") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=key_read,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    cwd=work,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                )
            for fd in (key_read, write_fd):
                os.close(fd)
            key_read = write_fd = -1
            # A timer kills on timeout while this thread blocks in waitpid: Popen.wait(timeout)
            # would poll with sleeps of up to 50 ms, most of a typical check's run time.
            expired = threading.Event()

            def kill() -> None:
                # The namespace's first process (unshare's child) first: the kernel then kills
                # everything in the PID namespace, and `unshare` reaps it and exits. (Killing
                # `unshare` first would orphan it as a zombie of the system's init.) Then, in
                # case the namespaces are not in use, the uid and the process group.
                _kill_children(proc.pid)
                if uid is not None:
                    _kill_uid(uid)
                _kill_group(proc.pid)

            timer = threading.Timer(self.limits.timeout_s, lambda: (expired.set(), kill()))
            timer.start()
            proc.wait()
            timer.cancel()
            timed_out = expired.is_set()
            # `unshare` returns only after its child, so the PID namespace is gone with all
            # it held; without namespaces, stragglers may remain in the group.
            if not self.prefix:
                _kill_group(proc.pid)
            os.set_blocking(read_fd, False)
            try:
                verdict = os.read(read_fd, 2 * TOKEN_BYTES)
            except BlockingIOError:  # a straggler held the pipe open; it is dead now
                verdict = b""
            detail = _tail(tmp / "output", self.limits.max_output_kb * 1024)
            if timed_out:
                status = "timeout"
            elif proc.returncode == 0 and verdict == token:
                status = "passed"
            elif proc.returncode < 0:
                status = "killed"
            else:
                status = "failed"
            return CheckResult(status == "passed", status, detail, time.monotonic() - start)
        finally:
            for fd in (key_read, read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_children(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every live process whose real uid is `uid`, until none is left; bounded, since a
    killed process cannot fork again. Reads the Uid line of /proc/<pid>/status: the owner of
    /proc/<pid> would do for most processes, but a process can make it root's by declaring
    itself non-dumpable (prctl), and the real uid is the one it cannot change."""
    wanted = f"Uid:\t{uid}\t"
    for _ in range(rounds):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status") as f:
                    status = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if wanted not in status or "State:\tZ" in status:  # zombies are already dead
                continue
            found = True
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not found:
            return
        time.sleep(0.01)


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode("utf-8", errors="replace")
