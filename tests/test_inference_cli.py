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
    spec, spec_stats = generate(capsys, *args, "--speculative")
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
    (line,) = out.err.strip().splitlines()  # one plain line, no JSON without --json
    assert line.startswith("plain: 12 tokens in ") and "1.00 tokens per forward" in line
    assert main(["generate", *args, "--completion-only"]) == 0
    assert out.out == "def f(x):" + capsys.readouterr().out


def test_compare_runs_both_modes_and_says_they_agree(run_dir, capsys):
    args = ["--checkpoint", str(run_dir), "--prompt", "def f(x):", "--max-tokens", "16"]
    assert main(["generate", *args, "--compare"]) == 0
    out = capsys.readouterr()
    plain, spec = out.err.strip().splitlines()
    assert plain.startswith("plain greedy: 16 tokens")
    assert spec.startswith("self-speculative: 16 tokens") and spec.endswith(
        "identical to greedy: yes"
    )
    assert "x plain greedy" in spec
    assert main(["generate", *args, "--compare", "--json"]) == 0
    report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert report["identical_to_greedy"] is True
    assert report["plain"]["tokens_per_forward"] == 1.0
    assert report["speculative"]["tokens"] == 16
    assert main(["generate", *args]) == 0
    assert capsys.readouterr().out == out.out  # --compare prints the greedy text once
