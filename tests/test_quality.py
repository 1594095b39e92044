"""Held-out quality scoring (mtp_dist/eval/quality.py, bench/quality.py): the strided windows
score every token exactly once with the promised context, the totals equal brute-force
references, compressor numbers are what gzip/xz give, and the CLI runs on a toy checkpoint."""

from __future__ import annotations

import copy
import gzip
import json
import lzma
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_models import save_checkpoint, template_code

from mtp_dist.checkpoint import padded_vocab
from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.eval.heldout_cli import progress_lines
from mtp_dist.eval.quality import (
    HeldOutFile,
    compressor_bits,
    evaluate,
    score_file,
    select_files,
    stream_bits,
    windows,
)
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "def f(x):\n    return x * 2  # é\n\nprint(f(21))\n"  # 47 bytes, 46 characters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: a second thread buys nothing and, on a loaded machine, made a 0.3 s test
    take 8 s (threads waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = ModelConfig(
        vocab_size=padded_vocab(tok.vocab_size),
        d_model=32,
        n_layers=5,
        n_attn_heads=2,
        n_future=2,
        max_seq_len=64,
    )
    return MTPModel(cfg).double().eval(), tok


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 40, 63])
@pytest.mark.parametrize("context,stride", [(16, 8), (16, 5), (16, 16), (16, 1), (7, 3)])
def test_windows_tile_inputs_once_with_promised_context(n, context, stride):
    scored = []
    for start, end, first in windows(n, context, stride):
        assert end - start == min(context, n)
        assert start <= first < end
        for p in range(first, end):
            # context of position p: tokens start..p; only the first window may give less
            assert p - start + 1 >= (min(p + 1, context - stride + 1))
        scored += range(first, end)
    assert scored == list(range(n))


def test_windows_reject_bad_stride():
    for stride in (0, 17):
        with pytest.raises(ValueError, match="stride"):
            windows(40, 16, stride)


def reference(model, tok, text, context, stride):
    """Every token on its own: target m (1..T) of seq = [EOS] + ids from the window the scheme
    promises: seq[0:m] while m <= context, else the full window of the stride step that first
    reaches input m - 1, i.e. ending at min(context + k * stride, T) for the smallest such k."""
    ids = tok.encode(text)
    seq = [tok.eos_id, *ids]
    T, n = len(ids), model.cfg.n_future
    bits, correct, counted = 0.0, [0] * n, [0] * n
    for p in range(T):  # input position p predicts seq[p + 1]
        if p < context:
            start = 0
        else:
            k = math.ceil((p + 1 - context) / stride)
            start = min(context + k * stride, T) - context
        window = torch.tensor([seq[start : p + 1]])
        h, cos, sin = model.trunk_forward(window)
        for i in range(n):
            logits = model.heads.logits(h, cos, sin, i)[0, -1]
            if p + i + 1 <= T:
                counted[i] += 1
                correct[i] += int(int(logits.argmax()) == seq[p + i + 1])
            if i == 0:
                bits -= float(torch.log_softmax(logits, -1)[seq[p + 1]]) / math.log(2)
    return bits, correct, counted


@torch.no_grad()
def test_one_window_equals_one_forward(tiny):
    model, tok = tiny
    ids = tok.encode(TEXT)
    score = score_file(model, tok, TEXT, context=len(ids) + 1, stride=4)
    seq = torch.tensor([[tok.eos_id, *ids]])
    h, cos, sin = model.trunk_forward(seq[:, :-1])
    logp = torch.log_softmax(model.heads.logits(h, cos, sin, 0)[0], -1)  # (T, V)
    direct = -float(logp.gather(-1, seq[0, 1:, None]).sum()) / math.log(2)
    assert score.tokens == len(ids) == 47 and score.bytes == 47
    assert score.bits == pytest.approx(direct, rel=1e-12)
    assert score.bits_per_byte == pytest.approx(direct / 47, rel=1e-12)
    assert score.counted == [47, 46]


@torch.no_grad()
def test_chained_one_window_equals_the_training_forward():
    """A chained model's depths in the scorer are the ones training computes: depth k reads
    depth k-1 and the embedded token t + k (zero at position 0). The training forward on the
    same window gives the same depth-0 bits and per-depth correct counts."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = ModelConfig(
        vocab_size=padded_vocab(tok.vocab_size), d_model=32, n_layers=5, n_attn_heads=2,
        n_future=3, max_seq_len=64, mtp_arch="chained",
    )  # fmt: skip
    model = MTPModel(cfg).double().eval()
    ids = tok.encode(TEXT)
    score = score_file(model, tok, TEXT, context=len(ids) + 1, stride=4)
    seq = torch.tensor([[tok.eos_id, *ids]])
    out = model(seq[:, :-1], seq[:, 1:])
    assert score.counted == out.head_counts.tolist() == [47, 46, 45]
    assert score.correct == out.head_correct.tolist()
    assert score.bits == pytest.approx(float(out.head_losses[0]) * 47 / math.log(2), rel=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("context,stride,batch", [(8, 3, 2), (8, 8, 16), (5, 2, 3)])
def test_strided_equals_token_by_token(tiny, context, stride, batch):
    model, tok = tiny
    text = TEXT * 2
    score = score_file(model, tok, text, context=context, stride=stride, batch_windows=batch)
    bits, correct, counted = reference(model, tok, text, context, stride)
    assert score.tokens == 94
    assert score.bits == pytest.approx(bits, rel=1e-10)
    assert (score.correct, score.counted) == (correct, counted)
    assert counted == [94, 93]


def test_score_file_rejects_text_that_does_not_round_trip(tiny):
    model, _ = tiny

    class Lossy(ByteTokenizer):
        def decode(self, ids):
            return super().decode(ids).upper()

    with pytest.raises(ValueError, match="round-trip"):
        score_file(model, Lossy(), "abc", context=8, stride=4)


def test_compressor_bits_are_eight_times_compressed_length():
    data = b"the quick brown fox jumps over the lazy dog\n" * 50
    bits = compressor_bits(data)
    assert bits["gzip"] == 8 * len(gzip.compress(data, compresslevel=9))
    assert bits["xz"] == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    assert bits["gzip"] / len(data) < 1  # very repetitive: far below 8 bits per byte


def test_stream_bits_are_the_same_streams_without_containers():
    """gzip's container is 18 bytes (10 header + 8 trailer) whatever the input; xz's ~56."""
    for data in (b"x", TEXT.encode(), TEXT.encode() * 400):
        whole, streams = compressor_bits(data), stream_bits(data)
        assert whole["gzip"] - streams["gzip"] == 8 * 18
        assert 8 * 50 <= whole["xz"] - streams["xz"] <= 8 * 62


def test_evaluate_reports_container_share_and_progress():
    """The compressors' share of container bits, and progress after every file (the CLI turns
    it into lines); no per-file mean for the compressors (on tiny files it measured headers)."""
    files = [HeldOutFile(Path("tiny.py"), "x = 1\n"), HeldOutFile(Path("big.py"), TEXT * 400)]
    calls = []
    report = evaluate(files, progress=lambda *a: calls.append(a))
    sizes = [len(f.data) for f in files]
    assert calls == [(1, sizes[0]), (2, sum(sizes))]
    gzip_bits = sum(compressor_bits(f.data)["gzip"] for f in files)
    assert report["gzip_bits_per_byte"] == gzip_bits / sum(sizes)
    assert report["gzip_container_share"] == pytest.approx(2 * 8 * 18 / gzip_bits)
    assert not any(key.endswith("file_mean") for key in report if key.startswith(("gzip", "xz")))


def test_progress_lines_when_stderr_is_not_a_terminal(capsys):
    """A line at the start, after a file when `every_s` has passed, and after the last."""
    report = progress_lines("mtp heldout", 3, 300, every_s=3600)
    for done in (1, 2, 3):
        report(done, 100 * done)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "mtp heldout: scoring 3 files, 300 bytes"
    assert len(lines) == 2 and lines[1].startswith("mtp heldout: scored 3/3 files (100% of")
    report = progress_lines("quality", 3, 300, every_s=0)
    for done in (1, 2, 3):
        report(done, 100 * done)
    assert len(capsys.readouterr().err.splitlines()) == 4


def test_table_labels_container_bits_and_has_no_file_mean(tmp_path, capsys):
    """On a tiny file gzip / xz exceed 8 bits/byte: their container is most of it. The table
    says how much, marks the figures, and no longer shows a 'file mean' row."""
    (tmp_path / "a.py").write_text("x = 1\nprint(x)\n")  # 15 bytes
    assert main(["heldout", "--compressors-only", "--files", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "file mean" not in out
    gzip_bpb = compressor_bits(b"x = 1\nprint(x)\n")["gzip"] / 15
    assert f"| bits/byte, total | — | {gzip_bpb:.3f}* | " in out
    assert "each file pays their container (18 / ~56 bytes): 51.4% / " in out
    assert "* over 10% container" in out
    assert captured.err.splitlines()[0] == "mtp heldout: scoring 1 file, 15 bytes"


def test_select_files_sorted_recursive_and_skips(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("z = 1\n")
    (tmp_path / "a.py").write_text("a = 1\r\n")
    (tmp_path / "bad.py").write_bytes(b"x = '\xff'\n")
    (tmp_path / "blank.py").write_text("  \n")
    (tmp_path / "notes.txt").write_text("not python\n")
    files, skipped = select_files(tmp_path, limit=10, tokenizer=ByteTokenizer())
    assert [f.path.name for f in files] == ["a.py", "z.py"]
    assert files[0].text == "a = 1\r\n"  # bytes as stored, no newline translation
    assert skipped == {"invalid_utf8": 1, "empty": 1}
    assert len(select_files(tmp_path, limit=1)[0]) == 1


def run_bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of bench/quality.py's main run in this process, which must exit."""
    monkeypatch.setattr(sys, "argv", ["quality.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "bench" / "quality.py"), run_name="__main__")
    captured = capsys.readouterr()
    assert captured.out == ""
    return exit_info.value.code, captured.err.strip()


def test_cli_on_toy_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    save_checkpoint(copy.deepcopy(model).float(), tok, tmp_path / "run")
    files = tmp_path / "files"
    files.mkdir()
    for k, text in enumerate(template_code(3, seed=1)):
        (files / f"f{k}.py").write_text(text)
    (files / "z.py").write_text("x = 1\n")  # the 4th in sorted order: left out by --limit

    out = run_bench("--checkpoint", str(tmp_path / "run"), "--files", str(files), "--limit", "3")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["files"] == 3 and report["checkpoint"].startswith(str(tmp_path / "run"))
    assert report["bytes"] == sum(len(t.encode()) for t in template_code(3, seed=1))
    assert report["tokens"] == report["bytes"]  # byte tokenizer
    assert (report["context"], report["stride"]) == (64, 32)  # data.seq_len of the checkpoint
    assert len(report["head_accuracy"]) == 2
    assert all(0 <= a <= 1 for a in report["head_accuracy"])
    # a random model is near uniform over its 320 rows (log2 320 = 8.3); gzip finds templates
    assert 7 < report["bits_per_byte"] < 10
    assert 0 < report["xz_bits_per_byte"] and 0 < report["gzip_bits_per_byte"] < 4
    assert report["bits_per_byte"] > report["gzip_bits_per_byte"]
    assert report["machine"]["torch_threads"] == 1
    assert "| bits/byte, total |" in out.stdout and "file mean" not in out.stdout
    # stderr is a pipe here, as in a Slurm log: progress shows all the same
    assert "quality: scored 3/3 files (100% of the bytes)" in out.stderr

    # The error paths in-process (a subprocess each would double the test's time).
    bad = run_main(monkeypatch, capsys, "--checkpoint", str(tmp_path / "run"), "--context", "65")
    assert bad == (2, "quality: --context 65 must be in [1, model.max_seq_len=64]")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(
        monkeypatch, capsys, "--checkpoint", str(tmp_path / "run"), "--files", str(empty)
    )
    assert code == 2 and err.startswith("quality: no usable .py files under")
    assert len(err.splitlines()) == 1
