"""Suite-wide guards."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang into a test failure (e.g. a FIFO opened for reading blocks forever)."""

    def expire(*_):
        raise TimeoutError(f"did not finish within {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _no_mlflow_uri_leak():
    """MLflow exports MLFLOW_TRACKING_URI when a URI is set; a test (or the code under test) that
    leaves it behind sends every later run and subprocess to the wrong store. Fail at the leak."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before, f"MLFLOW_TRACKING_URI leaked: {before!r} -> {after!r}"
