"""Single-process training: exact resume, NaN handling, checkpoints, tokenizer checks, MLflow."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from mtp_dist import checkpoint as ckpt
from mtp_dist.config import load_config
from mtp_dist.model import MTPModel
from mtp_dist.training import Trainer, TrainingAborted

STDLIB = Path(sysconfig.get_paths()["stdlib"])
RECIPE = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~40 real Python files (non-ASCII included) copied from the standard library."""
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py")):
        (root / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (root / "unicode.py").write_text("# café ünïcødé ✓ 日本語\nx = 'naïve'\n" * 50)
    return root


def tiny_cfg(run_dir: Path, corpus: Path, *overrides: str):
    return load_config(
        RECIPE,
        [
            f"run_dir={run_dir}",
            f"data.source={corpus}",
            "data.tokenizer=bytes",
            "data.seq_len=32",
            "data.val_fraction=0.2",
            "model.d_model=32",
            "model.n_layers=3",
            "model.n_attn_heads=2",
            "model.n_future=2",
            "model.max_seq_len=64",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=2",
            "train.max_steps=6",
            "train.warmup_steps=2",
            "train.eval_every=3",
            "train.eval_batches=2",
            "train.ckpt_every=3",
            "train.log_every=1",
            "tracking.enabled=false",
            *overrides,
        ],
    )


def losses(run_dir: Path) -> list[tuple[int, float, list[float]]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["head_losses"]) for r in map(json.loads, lines)]


def test_resume_is_exact(tmp_path, corpus):
    straight = tmp_path / "straight"
    Trainer(tiny_cfg(straight, corpus)).fit()
    split = tmp_path / "split"
    Trainer(tiny_cfg(split, corpus)).fit(stop_after=3)
    assert [s for s, _, _ in losses(split)] == [1, 2, 3]
    with (split / "metrics.jsonl").open("a") as f:  # a killed attempt's step past the checkpoint
        f.write(json.dumps({"step": 4, "loss": 0.0, "head_losses": [0.0, 0.0]}) + "\n")
    Trainer(tiny_cfg(split, corpus), resume=True).fit()
    assert losses(split) == losses(straight)  # bit-for-bit, loss for loss, head for head
    assert [s for s, _, _ in losses(straight)] == [1, 2, 3, 4, 5, 6]
    a = torch.load(ckpt.latest_checkpoint(straight) / "model.pt")
    b = torch.load(ckpt.latest_checkpoint(split) / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_reduces_loss_and_writes_artifacts(tmp_path, corpus):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, corpus, "train.max_steps=30", "train.lr=3e-3", "train.ckpt_every=10")
    Trainer(cfg).fit()
    history = losses(run)
    first, last = history[0][1], sum(loss for _, loss, _ in history[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert all(len(h) == 2 for _, _, h in history)
    assert (run / "loss_per_head.png").stat().st_size > 1000
    kept = ckpt.complete_checkpoints(run)
    assert [p.name for p in kept] == ["step_00000010", "step_00000020", "step_00000030"]
    model, tokenizer = ckpt.load_for_inference(run)
    assert tokenizer.kind == "bytes" and model.cfg.n_future == 2


def test_keep_last_prunes(tmp_path, corpus):
    run = tmp_path / "run"
    Trainer(tiny_cfg(run, corpus, "train.ckpt_every=1", "train.keep_last=2")).fit()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000005", "step_00000006"]
    assert not list(ckpt.checkpoints_dir(run).glob(".tmp-*"))


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    run = tmp_path / "run"
    Trainer(tiny_cfg(run, corpus)).fit(stop_after=3)
    with pytest.raises(TrainingAborted, match="--resume"):
        Trainer(tiny_cfg(run, corpus))
    with pytest.raises(TrainingAborted, match="model config differs"):
        Trainer(tiny_cfg(run, corpus, "model.d_model=64"), resume=True)


def test_incomplete_checkpoints_are_ignored(tmp_path, corpus):
    run = tmp_path / "run"
    Trainer(tiny_cfg(run, corpus)).fit(stop_after=3)
    root = ckpt.checkpoints_dir(run)
    (root / ".tmp-step_00000004").mkdir()  # a crash mid-write
    (root / "step_00000005").mkdir()  # renamed but no marker (cannot happen, but be safe)
    assert ckpt.latest_checkpoint(run).name == "step_00000003"
    trainer = Trainer(tiny_cfg(run, corpus), resume=True)
    assert trainer.step == 3


def test_corrupt_trainer_state_is_a_clear_error(tmp_path, corpus):
    run = tmp_path / "run"
    Trainer(tiny_cfg(run, corpus)).fit(stop_after=3)
    state = ckpt.latest_checkpoint(run) / "trainer.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="trainer.pt"):
        Trainer(tiny_cfg(run, corpus), resume=True)


def test_nan_steps_are_skipped_then_abort(tmp_path, corpus):
    trainer = Trainer(tiny_cfg(tmp_path / "run", corpus, "train.max_bad_steps=3"))
    real_step = trainer.engine.train_step
    calls = {"n": 0}

    def flaky(micro):  # one NaN step, then healthy, then NaN forever
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:
            with torch.no_grad():
                trainer.engine.model.embed.weight[0, 0] = float("nan")
                for window in micro:
                    window[:, 0] = 0  # make sure the poisoned row is used
        return real_step(micro)

    trainer.engine.train_step = flaky
    with pytest.raises(TrainingAborted, match="3 consecutive steps with non-finite loss"):
        trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, False, True, True, True]


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, corpus):
    from mtp_dist.tokenizers import train_sentencepiece

    run = tmp_path / "run"
    Trainer(tiny_cfg(run, corpus)).fit(stop_after=3)
    other = train_sentencepiece(sorted(corpus.glob("*.py")), tmp_path / "sp", vocab_size=400)
    with pytest.raises(ckpt.CheckpointError, match="tokenizer mismatch.*vocab_size=400"):
        ckpt.load_for_inference(run, tokenizer_dir=tmp_path / "sp")
    del other


def test_mlflow_run_has_params_metrics_and_artifacts(tmp_path, corpus, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # artifacts must land in the run directory, not ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    cfg = tiny_cfg(run, corpus, "tracking.enabled=true", "train.max_steps=3")
    Trainer(cfg).fit()
    client = mlflow.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "mtp_dist"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["model.n_future"] == "2"
    assert mlrun.data.params["train.lr"] == str(cfg.train.lr)
    for key in ("train/loss", "train/loss_head1", "train/loss_head2", "train/tokens_per_s",
                "train/grad_norm", "train/tokens_seen"):  # fmt: skip
        assert key in mlrun.data.metrics
    assert "val/loss_head2" in mlrun.data.metrics
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    assert mlrun.data.metrics["train/tokens_seen"] == 3 * tokens_per_step
    resolved = load_config(run / "config.yaml").model  # vocab from the tokenizer
    expected = sum(p.numel() for p in MTPModel(resolved).parameters())
    assert mlrun.data.tags["parameters"] == f"{expected:,}"
    assert mlrun.data.tags["checkpoint"] == str(ckpt.latest_checkpoint(run).resolve())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"loss_per_head.png", "config.yaml", "tokenizer"} <= artifacts
    assert (run / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow exports it; must not leak to later runs

    # Evaluations add their results to this run (bench/quality.py, bench/speculative.py), found
    # from a checkpoint directory or the run directory; a run without tracking gets nothing.
    from mtp_dist.tracking import log_to_training_run

    got = log_to_training_run(
        ckpt.latest_checkpoint(run), {"heldout/bits_per_byte": 2.5}, {"k": "v"}
    )
    assert got == mlrun.info.run_id and log_to_training_run(run, {"decode/speedup": 1.5}) == got
    again = client.get_run(got)
    assert again.data.metrics["heldout/bits_per_byte"] == 2.5 and again.data.tags["k"] == "v"
    assert again.data.metrics["decode/speedup"] == 1.5 and again.info.status == "FINISHED"
    assert log_to_training_run(tmp_path, {"x": 1.0}) is None


def test_trainer_leaves_the_callers_config_and_signal_handlers_alone(tmp_path, corpus):
    """The vocabulary and pad id come from the tokenizer into the trainer's own copy of the
    config; the SIGTERM / SIGUSR1 / SIGINT handlers that checkpoint-and-exit are only there
    during fit."""
    import signal

    cfg = tiny_cfg(tmp_path / "run", corpus, "train.max_steps=2")
    stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    before = {sig: signal.getsignal(sig) for sig in stops}
    trainer = Trainer(cfg)
    assert cfg.model.vocab_size == 0 and cfg.model.pad_id == -1
    assert trainer.cfg.model.vocab_size == ckpt.padded_vocab(trainer.tokenizer.vocab_size)
    seen = {}
    step = trainer.engine.train_step

    def spy(batches):
        seen.update({sig: signal.getsignal(sig) for sig in before})
        return step(batches)

    trainer.engine.train_step = spy
    trainer.fit()
    assert all(seen[sig] == trainer._request_stop for sig in before)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _interrupt_at(trainer: Trainer, step: int) -> None:
    """Ctrl-C (KeyboardInterrupt) during optimizer step `step`, before it is recorded."""
    real = trainer.engine.train_step

    def step_or_interrupt(micro):
        if trainer.step + 1 == step:
            raise KeyboardInterrupt
        return real(micro)

    trainer.engine.train_step = step_or_interrupt


def test_interrupt_before_the_first_checkpoint_leaves_each_step_once(tmp_path, corpus):
    """With no checkpoint the resume is a fresh start: the abandoned rows go, all of them (and
    a row cut short by a kill does not break the file)."""
    straight = tmp_path / "straight"
    Trainer(tiny_cfg(straight, corpus)).fit()
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg(run, corpus, "train.ckpt_every=100"))
    _interrupt_at(trainer, 5)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert [s for s, _, _ in losses(run)] == [1, 2, 3, 4] and not ckpt.latest_checkpoint(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a line a kill cut short
    Trainer(tiny_cfg(run, corpus, "train.ckpt_every=100"), resume=True).fit()
    assert losses(run) == losses(straight)


def test_resume_says_what_changed_and_keeps_the_previous_config(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    Trainer(tiny_cfg(run, corpus)).fit(stop_after=3)
    first = (run / "config.yaml").read_text()
    capsys.readouterr()
    changed = ("train.ckpt_every=2", "train.eval_batches=1")
    Trainer(tiny_cfg(run, corpus, *changed), resume=True).fit()
    out = capsys.readouterr().out
    assert "config changed since step_00000003:" in out
    assert "\n  train.eval_batches: 2 -> 1\n  train.ckpt_every: 3 -> 2\n" in out
    (kept,) = run.glob("config.*.yaml")
    assert kept.read_text() == first and f"previous one is kept as {kept}" in out
    assert load_config(run / "config.yaml").train.ckpt_every == 2
    # Another change: listed against the checkpoint resumed from, the config before kept.
    Trainer(tiny_cfg(run, corpus, *changed, "train.max_steps=7"), resume=True).fit()
    out = capsys.readouterr().out
    assert "train.max_steps: 6 -> 7" in out and "ckpt_every" not in out
    assert len(list(run.glob("config.*.yaml"))) == 2
    # The same settings written by another version of the code: nothing listed or kept.
    (run / "config.yaml").write_text(
        "# written by mtp_dist 0.0 (git 0000000)\n"
        + "".join(x + "\n" for x in (run / "config.yaml").read_text().splitlines()[1:])
    )
    Trainer(tiny_cfg(run, corpus, *changed, "train.max_steps=7"), resume=True).fit()
    out = capsys.readouterr().out
    assert "config changed" not in out and "kept as" not in out
    assert len(list(run.glob("config.*.yaml"))) == 2


def test_a_failed_setup_keeps_the_trained_tokenizer_and_removes_half_made_shards(
    tmp_path, corpus, monkeypatch, capsys
):
    """Interrupted in the data build: the tokenizer it trained stays (the rerun does not train
    it again), the shards without a manifest go."""
    import mtp_dist.training.trainer as trainer_module

    run = tmp_path / "new" / "run"
    cfg = tiny_cfg(run, corpus, "data.tokenizer=sentencepiece", "data.sp_vocab_size=600")
    prepare = trainer_module.prepare_shards

    def interrupted(cfg, tokenizer, runtime):
        data = Path(cfg.run_dir) / "data"
        data.mkdir()
        (data / "train-000000.tar").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "prepare_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg)
    assert "training a sentencepiece tokenizer" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]
    monkeypatch.setattr(trainer_module, "prepare_shards", prepare)
    Trainer(cfg).fit()
    out = capsys.readouterr().out
    assert "training a sentencepiece tokenizer" not in out and "done: step 6 of 6" in out

    # Nothing completed: nothing is left, not even the directories made for it.
    monkeypatch.setattr(trainer_module, "prepare_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg(tmp_path / "other" / "run", corpus))
    assert not (tmp_path / "other").exists()
