"""lm-evaluation-harness as an independent scorer (docs/interop.md, "lm-eval on the HF export"):
its `hf` model on `mtp export hf`'s directory, a `loglikelihood_rolling` task over held-out
CPython test files written to a local JSONL, must give the bits per byte that our own
`mtp_dist.eval.quality.evaluate` (bench/quality.py) gives on the same text.

The two agree token for token when both put EOS in front of a file (`prefix_token_id`; lm-eval's
default prefix is BOS) and our stride equals the context: lm-eval's rolling windows of
`max_length` tokens are then exactly our windows (the first scores `[EOS] + text[:L-1]`, the rest
are disjoint and the last is a full window ending at the file end), so files longer than the
window are covered too. lm-eval runs as the documented command, in a subprocess with the hub
switched off and its own HF_HOME, so neither the network nor a cache elsewhere can be used.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_models import STDLIB, save_checkpoint, stdlib_texts, train_toy_model

from mtp_dist.checkpoint import load_for_inference
from mtp_dist.checkpoint.hf import export_hf
from mtp_dist.eval.quality import HELD_OUT, HeldOutFile, evaluate, score_file
from mtp_dist.tokenizers import train_sentencepiece

# Both are in the dev extra; a missing one is a broken install, reported as a skip with -ra.
pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's `hf` model imports it

# Held-out (CPython's tests are not in the training corpus), 700-1800 bytes each: with the
# window below, the longer ones take several windows, the shorter one window.
FILES = ["test_abstract_numbers.py", "test_charmapcodec.py", "test_codecencodings_hk.py"]
WINDOW = 128
TASK = """\
task: mtp_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm_eval_run")
    tok = train_sentencepiece(sorted(STDLIB.glob("*.py"))[:80], out / "sp", 1000, max_mb=1)
    model = train_toy_model(
        tok, stdlib_texts("json"), n_future=2, d_model=32, seq_len=32, batch_size=8, steps=40
    )
    return save_checkpoint(model, tok, out / "run")


def lm_eval(hf_dir: Path, task_dir: Path, eos_id: int, home: Path) -> dict:
    """lm-eval's results JSON for the task in task_dir on hf_dir, offline."""
    out = home / "results"
    model_args = f"pretrained={hf_dir},dtype=float32,prefix_token_id={eos_id},max_length={WINDOW}"
    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
        "--device", "cpu", "--tasks", "mtp_heldout", "--include_path", str(task_dir),
        "--batch_size", "32", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"lm-eval failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1, f"expected one results file under {out}, got {results}"
    samples = sorted(out.rglob("samples_mtp_heldout_*.jsonl"))
    report = json.loads(results[0].read_text())
    report["samples"] = [json.loads(line) for line in samples[0].read_text().splitlines()]
    return report


def test_lm_eval_bits_per_byte_equal_ours(tmp_path, run):
    # Bytes, as select_files reads them: universal newlines would change the text.
    files = [HeldOutFile(p, p.read_bytes().decode("utf-8")) for p in (HELD_OUT / n for n in FILES)]
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": f.text}) + "\n" for f in files))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "heldout.yaml").write_text(TASK.format(data=data))
    hf_dir = export_hf(run, tmp_path / "hf")

    model, tok = load_for_inference(run)
    ours = evaluate(files, model, tok, context=WINDOW, stride=WINDOW)
    assert ours["tokens"] > 2 * WINDOW  # several windows, not one per file
    theirs = lm_eval(hf_dir, task_dir, tok.eos_id, tmp_path)
    bpb = theirs["results"]["mtp_heldout"]["bits_per_byte,none"]
    rel = abs(bpb - ours["bits_per_byte"]) / ours["bits_per_byte"]
    print(f"bits/byte: ours {ours['bits_per_byte']:.7f}, lm-eval {bpb:.7f}, rel. diff {rel:.1e}")
    assert rel <= 0.01, (ours["bits_per_byte"], bpb)
    # The criterion is 1%; the scorers do the same float32 arithmetic on the same tokens,
    # so per file they agree to rounding (~1e-7). 1e-5 still catches a one-token change of
    # context: BOS instead of EOS in front of a file, or our stride != lm-eval's window.
    for f, sample in zip(files, sorted(theirs["samples"], key=lambda s: s["doc_id"])):
        assert sample["doc"]["text"] == f.text, f.path.name  # lm-eval read the text unchanged
        log_likelihood, n_bytes = sample["bits_per_byte"]
        mine = score_file(model, tok, f.text, WINDOW, WINDOW)
        assert n_bytes == mine.bytes, f.path.name
        assert -log_likelihood / math.log(2) == pytest.approx(mine.bits, rel=1e-5), f.path.name
