"""Which mtp_dist is running: the package version and, from a git checkout, its commit.

`mtp --version` prints `version_string()`; every training run records `version_tags()` in its
MLflow tags, so a result can be traced to the code that made it.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def package_version() -> str:
    """pyproject's version as installed; the source tree's own when it is not installed."""
    try:
        return metadata.version("mtp_dist")
    except metadata.PackageNotFoundError:
        return __version__


@functools.cache
def git_commit() -> str:
    """The short hash of HEAD when mtp_dist runs from its own git checkout, else 'unknown'
    (an installed package, no git, or a package that sits inside some other repository)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # A site-packages inside a user's own repository would otherwise report that repository.
    if len(out) != 2 or Path(out[0]).resolve() != PACKAGE_DIR.parent:
        return "unknown"
    return out[1]


def version_string() -> str:
    """`mtp_dist 0.1.0 (git 66f46fe)`, or `mtp_dist 0.1.0 (git unknown)` outside a checkout."""
    return f"mtp_dist {package_version()} (git {git_commit()})"


def version_tags() -> dict[str, str]:
    """The MLflow tags that say which code trained a run."""
    return {"mtp_dist_version": package_version(), "git_commit": git_commit()}
