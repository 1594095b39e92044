"""The sandbox contains hostile generated code: a planted set, each scored failed, none harmful.

Every planted program either tries through Python (which the guard turns into an exception)
or around it through ctypes/libc (which only the namespaces, the uid and the limits stop). After
each: the evaluator is alive, the side effect did not happen, no process of the check's uid is
left, and its temporary directory is gone. Programs that try to report a pass without running
their tests (the forgeries) are scored failed too. Runs as root (as CI does): the full isolation is
asserted, not assumed.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from mtp_dist.eval.sandbox import Limits, Sandbox

LIBC = "import ctypes\nlibc = ctypes.CDLL(None)\n"
# b"ok" on an inherited pipe used to be the verdict: write it to every descriptor there may be.
OK_EVERYWHERE = (
    "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'ok')\n    except OSError: pass\n"
)
# Each tries to report a pass and ends (or fails) without running any test.
FORGERIES = {
    "forge: 'ok' on every fd, os._exit(0)": OK_EVERYWHERE + "os._exit(0)",
    "forge: os._exit(0) alone": "import os\nos._exit(0)\nassert False, 'tests'",
    "forge: 'ok' on every fd, sys.exit(0)": OK_EVERYWHERE + "import sys\nsys.exit(0)",
    "forge: 'ok' on every fd, raise": OK_EVERYWHERE + "raise RuntimeError('tests failed')",
    "forge: a guessed token on fd 3": "import os\nos.write(3, os.urandom(16))\nos._exit(0)",
    "forge: fd 3 reopened through /proc": (
        "import os\nopen('/proc/self/fd/3', 'wb').write(b'ok' * 8)\nos._exit(0)"
    ),
    "forge: libc write and _exit": LIBC
    + "for fd in range(64):\n    libc.write(fd, b'ok', 2)\nlibc._exit(0)",
}


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout_s=2.0, memory_mb=512), slots=6)


@pytest.fixture()
def project(tmp_path) -> Path:
    """A directory like the project tree: root-owned, world-readable, not world-writable."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "keep.py").write_text("precious = True\n")
    tmp_path.chmod(0o755)
    root.chmod(0o755)
    (root / "keep.py").chmod(0o644)
    return root


def _leftovers() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("mtp-check-")}


def _uid_processes(uids: list[int]) -> list[str]:
    """Live processes whose real uid is one of `uids` (zombies are dead already)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                status = Path(f"/proc/{name}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            uid = int(status.split("Uid:\t", 1)[1].split()[0])
            if uid in uids and "State:\tZ" not in status:
                found.append(status.splitlines()[0])
    return found


def test_runs_as_root_with_full_isolation(sandbox):
    assert os.geteuid() == 0, "CI runs the sandbox tests as root"
    assert sandbox.isolation == {
        "network": "namespace",
        "processes": "pid namespace + process group",
        "user": "dedicated uid per check",
        "filesystem": "private mounts; writable: own directory only",
    }


def test_correct_and_incorrect_programs(sandbox):
    good, bad, exit0, hard_exit = sandbox.run_many(
        [
            "import math\nassert math.gcd(12, 18) == 6\nprint('x' * 10**6)",
            "assert sorted([3, 1]) == [3, 1], 'wrong'",
            "import sys\nsys.exit(0)\nassert False",
            "import os\nos._exit(0)",
        ],
        workers=4,
    )
    assert (good.passed, good.status) == (True, "passed")
    assert bad.status == "failed" and "AssertionError: wrong" in bad.detail
    assert exit0.status == "failed"  # leaving early is not passing
    assert hard_exit.status == "failed"


def test_planted_attacks_are_contained(sandbox, project, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    keep = project / "keep.py"
    me = os.getpid()
    outside_tmp = f"/tmp/mtp-sandbox-escape-{me}"
    planted = {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "fork bomb (libc)": LIBC + "while True:\n    libc.fork()",
        "huge allocation": "x = bytearray(8 * 1024**3)\nassert x",
        "write outside": f"open({str(project / 'pwned.py')!r}, 'w').write('x')",
        "write outside (libc)": LIBC
        + f"fd = libc.open({str(project / 'pwned2').encode()!r}, 0o101, 0o644)\nassert fd >= 0",
        "write /tmp": f"open({outside_tmp!r}, 'w').write('x')\nassert False, 'scored anyway'",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "socket (libc)": LIBC + "assert libc.socket(2, 1, 0) < 0, 'socket made'",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "kill evaluator": f"import os\nos.kill({me}, 9)",
        "kill (libc)": LIBC + f"for pid in ({me}, 0, -1):\n    libc.kill(pid, 9)\nassert False",
        "delete file": f"import os\nos.remove({str(keep)!r})",
        "delete tree": f"import shutil\nshutil.rmtree({str(project)!r})",
        "delete (libc)": LIBC + f"assert libc.unlink({str(keep).encode()!r}) == 0",
        "subprocess": "import subprocess\nsubprocess.run(['rm', '-rf', '/work'])",
        **FORGERIES,
    }
    before = _leftovers()
    results = dict(zip(planted, sandbox.run_many(list(planted.values()), workers=6)))
    for name, result in results.items():
        assert not result.passed, (name, result)
    assert results["infinite loop"].status == "timeout"
    assert results["huge allocation"].status == "failed"
    assert "MemoryError" in results["huge allocation"].detail
    assert "Network is unreachable" in results["socket"].detail
    assert all(results[name].status == "failed" for name in FORGERIES)
    with pytest.raises(TimeoutError):  # nobody reached the evaluator's listener
        listener.accept()
    listener.close()
    assert keep.read_text() == "precious = True\n"
    assert sorted(p.name for p in project.iterdir()) == ["keep.py"]
    assert not os.path.exists(outside_tmp)
    assert _leftovers() <= before  # every check's directory removed
    assert not _uid_processes(list(sandbox.uids.queue))  # fork bombs killed whole
    assert threading.main_thread().is_alive()  # and we are still here to check


def test_escaping_the_process_group_is_still_killed(sandbox):
    """Processes that leave the process group (setsid via libc), the first one also hidden
    from a scan of /proc owners (non-dumpable), sleeping: the timeout must still kill them all
    (the PID namespace dies with its first process; the sweep goes by real uid)."""
    program = LIBC + (
        "import time\n"
        "libc.setsid()\n"
        "libc.prctl(4, 0)\n"  # PR_SET_DUMPABLE 0: /proc/<pid> becomes root's
        "if libc.fork() == 0:\n"
        "    libc.setsid()\n"
        "    time.sleep(60)\n"
        "time.sleep(60)\n"
    )
    result = sandbox.run(program)
    assert result.status == "timeout"
    assert not _uid_processes(list(sandbox.uids.queue))


def test_writes_land_in_the_checks_own_directory(sandbox):
    program = (
        "import os\n"
        "open('here.txt', 'w').write('x')\n"
        "open('/tmp/there.txt', 'w').write('y')\n"
        "assert sorted(os.listdir('.')) == ['here.txt', 'there.txt'], os.listdir('.')\n"
        "assert os.getuid() != 0 and os.getgid() != 0\n"
    )
    assert sandbox.run(program).passed
    assert not os.path.exists("/tmp/there.txt")


def test_the_code_holds_no_descriptor_of_the_evaluator_but_the_result_pipe(sandbox):
    """What a genuine program sees: stdin empty, stdio plus the result pipe at 3 and nothing
    else (the pipe that carried the token is closed) -- and it still passes."""
    program = (
        "import os\n"
        "fds = sorted(int(fd) for fd in os.listdir('/proc/self/fd'))\n"
        "assert fds[:4] == [0, 1, 2, 3] and len(fds) == 5, fds\n"  # 5th: the listing itself
        "assert os.readlink('/proc/self/fd/3').startswith('pipe:')\n"
        "assert os.readlink('/proc/self/fd/0') == '/dev/null' and os.read(0, 1) == b''\n"
    )
    result = sandbox.run(program)
    assert (result.passed, result.status) == (True, "passed"), result.detail
