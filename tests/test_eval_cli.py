"""`mtp eval` end to end on a checkpoint: both benchmarks, greedy and sampled pass@k, results on
stdout, in the JSON file and in MLflow. A random model scores ~0: the harness is under test."""

from __future__ import annotations

import json

import torch
from toy_models import save_checkpoint

from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer


def toy_run(root):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320, d_model=32, n_layers=3, n_attn_heads=4, n_future=2, max_seq_len=128
    )
    run = root / "run"
    save_checkpoint(MTPModel(cfg), ByteTokenizer(), run, step=7)
    return run


def test_eval_end_to_end(tmp_path, capsys, monkeypatch):
    run = toy_run(tmp_path)
    out = tmp_path / "results.json"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["eval", "--checkpoint", str(run), "--benchmark", "both", "--limit", "3"]
    args += ["--samples", "2", "--k", "1,2,10", "--max-tokens", "12", "--out", str(out)]
    assert main([*args, "--mlflow-uri", uri, "--speculative", "--timeout", "5"]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "humaneval: problems=3 pass@1=" in stdout and "mbpp: problems=3 pass@1=" in stdout
    assert "None" not in stdout and "pass@10" not in stdout  # 2 samples: no pass@10
    assert "mtp eval: pass@10 not computed: needs --samples >= k" in captured.err
    report = json.loads(out.read_text())
    assert report["isolation"]["network"] == "namespace"
    assert report["checkpoint"].endswith("step_00000007")
    for bench in ("humaneval", "mbpp"):
        metrics = report["results"][bench]
        assert set(metrics) == {
            "problems",
            "pass@1",
            "pass@1_sampled",
            "pass@2",
            "pass@10",
            "seconds",
        }
        assert metrics["pass@10"] is None and 0.0 <= metrics["pass@2"] <= 1.0
        records = report["problems"][bench]
        assert len(records) == 3 and all(r["samples"] == 2 for r in records)
        assert all(isinstance(r["greedy_completion"], str) for r in records)

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["mtp_dist"])
    assert len(runs) == 1 and runs.loc[0, "tags.kind"] == "eval"
    assert "metrics.humaneval/pass_at_1" in runs.columns
    assert "metrics.mbpp/pass_at_2" in runs.columns


def test_eval_references_self_test(tmp_path, capsys):
    out = tmp_path / "refs.json"
    args = ["eval", "--references", "--benchmark", "mbpp", "--limit", "5", "--out", str(out)]
    assert main([*args, "--no-mlflow"]) == 0
    assert "mbpp: problems=5 pass@1=1.0" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"]["mbpp"]["pass@1"] == 1.0


def test_greedy_only_prints_what_it_computed(tmp_path, capsys):
    """--samples 0: pass@1 alone, not `pass@10=None pass@100=None` (the default --k)."""
    out = tmp_path / "greedy.json"
    args = ["eval", "--checkpoint", str(toy_run(tmp_path)), "--benchmark", "mbpp", "--limit"]
    args += ["1", "--samples", "0", "--max-tokens", "4", "--no-mlflow", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    (line,) = [x for x in captured.out.splitlines() if x.startswith("mbpp:")]
    assert line.startswith("mbpp: problems=1 pass@1=") and "None" not in line
    assert "pass@10" not in line and "not computed" not in captured.err
    assert json.loads(out.read_text())["results"]["mbpp"]["pass@10"] is None  # JSON: null


def test_references_write_nothing_unless_asked(tmp_path, capsys, monkeypatch):
    """The self-test has no run directory; it used to put eval/ and mlflow.db in the current
    one. Now: nothing without --out / --mlflow-uri, and only there with them."""
    import mlflow

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["eval", "--references", "--benchmark", "mbpp", "--limit", "2"]
    assert main(args) == 0
    assert "mbpp: problems=2 pass@1=1.0" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert main([*args, "--mlflow-uri", uri]) == 0
    assert list(cwd.iterdir()) == []
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mtp_dist").experiment_id])
    assert run.data.metrics["mbpp/pass_at_1"] == 1.0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["eval-references.json"]
    assert sorted(p.name for p in store.iterdir()) == ["mlartifacts", "mlflow.db"]
