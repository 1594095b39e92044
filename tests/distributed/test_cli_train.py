"""`mtp train` under torchrun with 2 processes (plain data parallel, ZeRO-1), end to end:
data, DeepSpeed engine, checkpoint, then `mtp checkpoint consolidate` -> load_for_inference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import free_port

from mtp_dist.checkpoint import load_for_inference

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_data_parallel_train_then_consolidate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "mtp_dist.cli", "train",
        "configs/tiny-cpu.yaml", f"run_dir={run}", "parallel.zero_stage=1",
        "data.tokenizer=bytes", "model.d_model=64", "model.n_attn_heads=4", "model.n_layers=5",
        "data.seq_len=32",
        "train.micro_batch_size=2", "train.max_steps=2", "train.ckpt_every=2",
        "train.eval_every=0", "tracking.enabled=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "complete.json").is_file()
    assert json.loads((ckpt / "layout.json").read_text())["data"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and len(r["head_losses"]) == 4 for r in records)
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert len(state["data"]) == 2  # one reader position per data-parallel rank

    out = tmp_path / "consolidated"
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.cli", "checkpoint", "consolidate", str(run), "--out",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tokenizer = load_for_inference(out)
    ids = torch.tensor([tokenizer.encode("def f(x):")])
    assert model.next_token_logits(ids).shape[-1] == model.cfg.vocab_size
