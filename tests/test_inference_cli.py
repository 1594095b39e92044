"""`mtp generate` from a checkpoint on disk: plain and --speculative print the same completion."""

from __future__ import annotations

import json

import pytest
import torch
from toy_models import save_checkpoint

from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320,
        d_model=32,
        n_layers=5,
        n_attn_heads=4,
        n_future=4,
        max_seq_len=64,
        init_std=0.2,
    )
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(MTPModel(cfg), ByteTokenizer(), run, step=3)
    return run


def generate(capsys, *args: str) -> tuple[str, dict]:
    assert main(["generate", *args, "--json"]) == 0
    out = capsys.readouterr()
    return out.out, json.loads(out.err.strip().splitlines()[-1])


def test_generate_plain_and_speculative_agree(run_dir, capsys):
    args = ["--checkpoint", str(run_dir), "--prompt", "def f(x):", "--max-tokens", "20"]
    plain, plain_stats = generate(capsys, *args)
    # Three drafts whatever they cost here (auto: tests/test_decode_auto.py).
    spec, spec_stats = generate(capsys, *args, "--speculative", "--n-draft", "3")
    assert plain == spec and plain.strip()
    assert plain_stats["tokens_per_forward"] == 1.0
    assert len(spec_stats["acceptance_rate"]) == 4
    assert spec_stats["finish_reason"] in ("length", "eos")


def test_generate_from_checkpoint_dir_with_sampling_and_stop(run_dir, capsys):
    ckpt = next((run_dir / "checkpoints").iterdir())
    args = [
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "x = ",
        "--max-tokens",
        "30",
        "--completion-only",
    ]
    sampled = [
        generate(capsys, *args, "--temperature", "1.0", "--top-p", "0.9", "--seed", s)[0]
        for s in ("1", "1", "2")
    ]
    assert sampled[0] == sampled[1]
    free, _ = generate(capsys, *args)
    stop = free.strip()[3:5]
    cut, stats = generate(capsys, *args, "--stop", stop)
    assert stop not in cut and free.startswith(cut.rstrip("\n"))
    assert stats["finish_reason"] == "stop"


def test_generate_shows_the_prompt_with_its_completion(run_dir, capsys):
    args = ["--checkpoint", str(run_dir), "--prompt", "def f(x):", "--max-tokens", "12"]
    assert main(["generate", *args]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f(x):")
    # What decoding runs with, then one plain line, no JSON without --json.
    setup, line = out.err.strip().splitlines()
    assert setup.startswith("decoding: fp32 (CPU native bf16: ") and "not compiled" in setup
    assert line.startswith("plain: 12 tokens in ") and "1.00 tokens per forward" in line
    assert main(["generate", *args, "--completion-only"]) == 0
    assert out.out == "def f(x):" + capsys.readouterr().out


def test_compare_runs_both_modes_and_says_they_agree(run_dir, capsys):
    args = ["--checkpoint", str(run_dir), "--prompt", "def f(x):", "--max-tokens", "16"]
    assert main(["generate", *args, "--compare"]) == 0
    out = capsys.readouterr()
    setup, plain, spec = out.err.strip().splitlines()
    assert setup.startswith("decoding: ")
    assert plain.startswith("plain greedy: 16 tokens")
    assert spec.startswith("self-speculative: 16 tokens")
    assert "x plain greedy, identical to greedy: yes" in spec
    assert main(["generate", *args, "--compare", "--json"]) == 0
    report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert report["identical_to_greedy"] is True
    assert report["plain"]["tokens_per_forward"] == 1.0
    assert report["speculative"]["tokens"] == 16
    assert main(["generate", *args]) == 0
    assert capsys.readouterr().out == out.out  # --compare prints the greedy text once


def test_compare_says_why_drafting_does_not_pay(run_dir, capsys, monkeypatch):
    """Step costs (injected) where no block pays: the speculative line says so, with them."""
    from mtp_dist.inference import auto

    costs = auto.StepCosts({1: 1.0, 2: 2.5, 3: 3.3, 4: 4.8})
    monkeypatch.setattr(auto, "_COSTS", {})
    monkeypatch.setattr(auto, "measure_step_costs", lambda dec, prompts, widest: costs)
    args = ["--checkpoint", str(run_dir), "--prompt", "def f(x):", "--max-tokens", "16"]
    assert main(["generate", *args, "--compare"]) == 0
    spec = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1.00 tokens per forward (0 draft heads)" in spec
    assert spec.endswith(
        "identical to greedy: yes; drafting does not pay (a block of 3 costs 3.30x one token "
        "here): decoded plainly"
    )
