"""The `mtp` command line end to end, as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = [
    "data.seq_len=32",
    "data.sp_vocab_size=600",
    "data.val_fraction=0.2",
    "model.d_model=32",
    "model.n_layers=4",
    "model.n_attn_heads=2",
    "model.max_seq_len=128",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.ckpt_every=2",
    "tracking.enabled=false",
]


def mtp(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtp_dist.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_every_subcommand():
    out = mtp("--help").stdout
    for name in ("train", "tokenizer", "data", "generate", "eval", "checkpoint"):
        assert name in out


def test_config_error_is_one_line_and_exit_2(tmp_path):
    proc = mtp(
        "train", "configs/tiny-cpu.yaml", f"run_dir={tmp_path}", "model.n_futur=2", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.n_futur" in proc.stderr


def test_train_then_generate_with_sentencepiece(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((STDLIB / "json").glob("*.py")):
        (corpus / path.name).write_text(path.read_text())
    run = tmp_path / "run"
    mtp("train", "configs/tiny-cpu.yaml", f"run_dir={run}", f"data.source={corpus}", *TINY)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    # --resume on a finished run is a no-op that still succeeds.
    mtp(
        "train",
        "configs/tiny-cpu.yaml",
        f"run_dir={run}",
        f"data.source={corpus}",
        *TINY,
        "--resume",
    )
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    prompt = "def decode(s):\n"
    plain = mtp("generate", "--checkpoint", str(run), "--prompt", prompt, "--max-tokens", "12")
    fast = mtp(
        "generate",
        "--checkpoint",
        str(run),
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--speculative",
        "--json",
    )
    assert plain.stdout == fast.stdout and plain.stdout.startswith(prompt)
    stats = json.loads(fast.stderr.strip().splitlines()[-1])
    assert stats["tokens"] == 12 and stats["finish_reason"] == "length"
    assert stats["tokens_per_forward"] >= 1.0


def test_train_ends_with_a_summary_and_keeps_library_logs_quiet(tmp_path):
    """What a person reads: validation lines and losses at 3 decimals, no raw float list, a
    summary block last (time, tokens, losses, checkpoint, the commands to run next); MLflow's
    and alembic's INFO lines only with -v."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((STDLIB / "json").glob("*.py")):
        (corpus / path.name).write_text(path.read_text())
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def train(run: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mtp_dist.cli", "train", "configs/tiny-cpu.yaml", *TINY,
               f"data.source={corpus}", "data.tokenizer=bytes", "model.n_future=2",
               "tracking.enabled=true", f"run_dir={run}", *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run = tmp_path / "quiet"
    proc = train(run)
    lines = proc.stdout.strip().splitlines()
    val = [line for line in lines if line.startswith("step ")]
    assert len(val) == 2 and all(
        re.fullmatch(r"step [24]: validation loss per head \d+\.\d{3} \d+\.\d{3}", v) for v in val
    ), val
    summary = lines[lines.index("done: step 4 of 4") :]
    assert re.fullmatch(r"  time: .*, [\d,]+ tokens/s.*; [\d.]+k? tokens seen", summary[1])
    pair = r"\d+\.\d{3} \d+\.\d{3}"
    assert re.fullmatch(rf"  train loss per head \(last 4 steps\): {pair}", summary[2])
    assert re.fullmatch(rf"  validation loss per head \(step 4\): {pair}", summary[3])
    assert summary[4:] == [
        f"  checkpoint: {run}/checkpoints/step_00000004",
        "next:",
        f"  mtp generate --checkpoint {run} --prompt 'def add(a, b):' --compare",
        f"  mtp heldout --checkpoint {run}",
        f"  mtp export hf {run} OUT_DIR",
    ]
    assert not re.search(r"\[-?\d", proc.stdout)  # no raw float list
    assert "INFO" not in proc.stdout + proc.stderr and "alembic" not in proc.stderr
    assert "INFO mlflow" in train(tmp_path / "verbose", "-v").stderr


def test_lazy_subcommands_show_the_same_help():
    """`mtp --help` lists the subcommands without importing them; what it says is what their
    own `register` says."""
    from mtp_dist.cli import build_parser

    assert build_parser(load=()).format_help() == build_parser().format_help()


def test_every_package_and_the_recipes_are_shipped():
    """pyproject.toml lists the packages (so that configs/ can be mapped in as
    mtp_dist.recipes): a package missing from the list would be missing from an install."""
    import tomllib

    from setuptools import find_namespace_packages

    root = Path(__file__).parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_namespace_packages(str(root), include=["mtp_dist*", "data_pipeline*"])
    assert sorted(setup["packages"]) == sorted([*found, "mtp_dist.recipes"])
    assert setup["package-dir"] == {"mtp_dist.recipes": "configs"}


def test_user_error_names_resolve():
    """The errors `main` reports in one line are looked up by name: every name must exist."""
    import importlib

    from mtp_dist.cli import _USER_ERRORS

    for module, names in _USER_ERRORS.items():
        for name in names:
            assert issubclass(getattr(importlib.import_module(module), name), Exception)


def test_version_names_the_package_and_its_commit():
    from importlib import metadata

    root = Path(__file__).parent.parent
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    proc = mtp("--version")
    assert proc.stdout == f"mtp_dist {metadata.version('mtp_dist')} (git {head or 'unknown'})\n"
    assert proc.stderr == ""


def test_git_commit_is_unknown_outside_its_own_checkout(tmp_path, monkeypatch):
    """No git repository, or one that is not mtp_dist's (a venv inside a user's project)."""
    from mtp_dist import version

    outside = tmp_path / "site-packages" / "mtp_dist"
    outside.mkdir(parents=True)
    for where in ("not a repository", "another repository"):
        if where == "another repository":
            subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
            subprocess.run(
                ["git", "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q",
                 "--allow-empty", "-m", "x"], cwd=tmp_path, check=True,
            )  # fmt: skip
        monkeypatch.setattr(version, "PACKAGE_DIR", outside)
        version.git_commit.cache_clear()
        assert version.git_commit() == "unknown", where
    version.git_commit.cache_clear()


def test_training_runs_are_tagged_with_version_and_commit(tmp_path):
    import mlflow

    from mtp_dist.config import load_config
    from mtp_dist.tracking import MLflowTracker
    from mtp_dist.version import git_commit, package_version

    cfg = load_config("configs/tiny-cpu.yaml", [f"run_dir={tmp_path}"])
    tracker = MLflowTracker(cfg)
    tracker.close()
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.data.tags["mtp_dist_version"] == package_version()
    assert run.data.tags["git_commit"] == git_commit() != ""
