"""Suite-wide guards."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_mlflow_uri_leak():
    """MLflow exports MLFLOW_TRACKING_URI when a URI is set; a test (or the code under test) that
    leaves it behind sends every later run and subprocess to the wrong store. Fail at the leak."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before, f"MLFLOW_TRACKING_URI leaked: {before!r} -> {after!r}"
