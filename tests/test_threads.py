"""The CPU thread rule (mtp_dist/threads.py): the default wait policy is set when the user set
none, a user's own setting wins, and `mtp` sets it before torch is imported. No timing here:
the speed of each choice is bench/threads.py's (docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtp_dist.threads import DEFAULTS, USER_WAIT_SETTINGS, apply_thread_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_set_when_the_user_set_nothing():
    env = {"PATH": "/bin", "OMP_NUM_THREADS": "2"}
    assert apply_thread_defaults(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("key", USER_WAIT_SETTINGS)
def test_a_user_wait_setting_wins(key):
    env = {key: "ACTIVE" if key == "OMP_WAIT_POLICY" else "7"}
    before = dict(env)
    assert apply_thread_defaults(env) == {}
    assert env == before


def test_the_thread_count_is_never_touched():
    env = {"OMP_NUM_THREADS": "1"}
    apply_thread_defaults(env)
    assert env["OMP_NUM_THREADS"] == "1"
    env = {}
    apply_thread_defaults(env)
    assert "OMP_NUM_THREADS" not in env  # torch takes it from the CPU affinity


def test_default_environ_is_the_process_environment(monkeypatch):
    for key in USER_WAIT_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert apply_thread_defaults() == DEFAULTS
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


# A real command that imports torch and stops at once (no such checkpoint: exit 2); the import
# hook reports the environment at the moment `import torch` starts, when libgomp reads it.
PROBE = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class Probe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch":
                print("at import torch:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
                sys.meta_path.remove(self)
            return None

    sys.meta_path.insert(0, Probe())
    from mtp_dist.cli import main
    status = main(["generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"])
    import torch  # noqa: F401  (should the command ever stop before importing it)
    sys.exit(status)
    """
)


def _probe(extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in USER_WAIT_SETTINGS}
    env.update(extra, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("extra", "seen"), [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")]
)
def test_mtp_sets_it_before_torch_is_imported(extra, seen):
    out = _probe(extra)
    assert out.returncode == 2, out.stderr  # the missing checkpoint, as a one-line error
    assert f"at import torch: {seen}\n" in out.stdout, out.stdout + out.stderr
