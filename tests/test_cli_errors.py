"""What a user can get wrong, through the `mtp` command line: each is one line on stderr and
exit status 2, and nothing is lost or left half made (no run directory appears, an existing
checkpoint is left byte for byte). Most run `main()` in-process, where an unexpected traceback
fails the test; the import-cost and working-directory cases run a real process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_models import STDLIB, save_checkpoint

from mtp_dist.cli import main
from mtp_dist.config import ConfigError, ModelConfig
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer

TINY = [
    "data.tokenizer=bytes",
    "model.d_model=32",
    "model.n_layers=5",
    "model.n_attn_heads=2",
    "model.max_seq_len=64",
    "data.seq_len=16",
    "data.val_fraction=0",
    "train.max_steps=2",
    "train.ckpt_every=1",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "tracking.enabled=false",
]
CONTEXT = 64


def mtp(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `mtp ARGS`, run in this process."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    return code, capsys.readouterr().err


def one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted((STDLIB / "json").glob("*.py")):
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A run trained for two steps, checkpointed at both."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, f"data.source={corpus}", f"run_dir={run}"]) == 0
    return run


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320, d_model=32, n_layers=3, n_attn_heads=4, n_future=2, max_seq_len=CONTEXT
    )
    run = tmp_path_factory.mktemp("toy")
    save_checkpoint(MTPModel(cfg), ByteTokenizer(), run, step=1)
    return run


def train_args(run: Path, source: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"data.source={source}", f"run_dir={run}", *extra]


# -- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_missing_checkpoint(capsys, tmp_path, command):
    code, err = mtp(capsys, command, "--checkpoint", str(tmp_path / "DOES-NOT-EXIST"))
    assert code == 2
    one_line(err, f"mtp {command}: ", "DOES-NOT-EXIST", "no such run or checkpoint directory")


def test_existing_run_without_resume(capsys, run_copy, corpus):
    before = digest(run_copy)
    code, err = mtp(capsys, *train_args(run_copy, corpus))
    assert code == 2
    one_line(err, "mtp train: ", "already holds checkpoint step_00000002", "--resume")
    assert digest(run_copy) == before


def test_truncated_optimizer_names_the_earlier_checkpoint(capsys, run_copy, corpus):
    broken = run_copy / "checkpoints" / "step_00000002"
    truncate(broken / "optimizer.pt")
    before = digest(run_copy / "checkpoints")
    # Overrides after --resume are overrides (users type them in either order).
    code, err = mtp(capsys, *train_args(run_copy, corpus, "--resume", "train.max_steps=3"))
    assert code == 2
    line = one_line(err, "optimizer.pt", "truncated or corrupt", "step_00000001 is untouched")
    assert digest(run_copy / "checkpoints") == before
    # Doing what the line says resumes from the earlier checkpoint.
    aside = line.split("`mv ")[1].split("`")[0].split()[1]
    broken.rename(aside)
    assert main(train_args(run_copy, corpus, "--resume", "train.max_steps=3")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (run_copy / "checkpoints" / "step_00000003").is_dir()


def test_truncated_model_without_an_earlier_checkpoint(capsys, run_copy, corpus):
    shutil.rmtree(run_copy / "checkpoints" / "step_00000001")
    truncate(run_copy / "checkpoints" / "step_00000002" / "model.pt")
    before = digest(run_copy)
    code, err = mtp(capsys, *train_args(run_copy, corpus, "--resume"))
    assert code == 2
    one_line(err, "step_00000002/model.pt", "truncated or corrupt", "no earlier complete")
    assert digest(run_copy) == before


def test_truncated_model_for_generate(capsys, run_copy):
    truncate(run_copy / "checkpoints" / "step_00000002" / "model.pt")
    code, err = mtp(capsys, "generate", "--checkpoint", str(run_copy), "--prompt", "x")
    assert code == 2
    one_line(err, "mtp generate: ", "step_00000002/model.pt", "truncated or corrupt")


def test_resume_with_another_model(capsys, run_copy, corpus):
    code, err = mtp(capsys, *train_args(run_copy, corpus, "--resume", "model.d_model=64"))
    assert code == 2
    one_line(err, "model.d_model=64 (checkpoint: 32)")


def test_resume_a_chained_checkpoint_as_the_parallel_family(capsys, tmp_path, corpus):
    """A checkpoint of one MTP family resumed as the other: one line naming the key, and the
    checkpoint left as it was."""
    chained = tmp_path / "chained"
    assert main(train_args(chained, corpus, "model.mtp_arch=chained")) == 0
    capsys.readouterr()
    before = digest(chained / "checkpoints")
    code, err = mtp(capsys, *train_args(chained, corpus, "--resume", "train.max_steps=3"))
    assert code == 2
    one_line(err, "model.mtp_arch='parallel' (checkpoint: 'chained')")
    assert digest(chained / "checkpoints") == before


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.mtp_arch=chain", "model.mtp_arch: must be one of parallel, chained (got 'chain')"),
        ("model.mtp_loss_weight=0.1", "model.mtp_loss_weight: weights the chained family's"),
        ("parallel.head=2 model.mtp_arch=chained", "parallel.head: does not apply to model.mtp"),
    ],
)
def test_family_options_refused_before_any_work(capsys, tmp_path, corpus, override, needle):
    run = tmp_path / "run"
    code, err = mtp(capsys, *train_args(run, corpus, *override.split()))
    assert code == 2
    one_line(err, "mtp train: ", needle)
    assert not run.exists()


# -- the corpus -----------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer", ["bytes", "sentencepiece"])
@pytest.mark.parametrize("source", ["missing", "empty"])
def test_no_corpus_leaves_no_run_dir(capsys, tmp_path, source, tokenizer):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    args = train_args(run, tmp_path / source, f"data.tokenizer={tokenizer}")
    code, err = mtp(capsys, *args)
    assert code == 2
    why = "does not exist" if source == "missing" else "no files matching **/*.py"
    one_line(err, f"mtp train: data.source={tmp_path / source}: {why}")
    assert not run.exists()


def test_failed_setup_keeps_what_was_built(capsys, tmp_path):
    """A failure after the data work started keeps the shards it completed (and nothing else
    appears): the rerun reuses them instead of building again."""
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.py").write_text("x = 1\n")  # too little for one batch
    run = tmp_path / "new" / "run"
    code, err = mtp(capsys, *train_args(run, tmp_path / "small"))
    assert code == 2
    # The shard build ran (its progress and report on stderr) before the reader refused it.
    last = err.strip().splitlines()[-1]
    assert last.startswith("mtp train: ") and "split 'train' has 1 windows" in last
    assert "Traceback" not in err and "data build:" in err
    assert (run / "data" / "manifest.json").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["data"]  # no checkpoint, config, metrics
    code, err = mtp(capsys, *train_args(run, tmp_path / "small"))
    assert code == 2 and "data build:" not in err  # reused, not rebuilt
    one_line(err, "mtp train: ", "split 'train' has 1 windows")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.device=cuda", "train.device=cuda: no CUDA device is available"),
        ("tracking.uri=notascheme://x", "tracking.uri=notascheme://x: unknown scheme 'notascheme'"),
        ("tracking.uri={tmp}/mlruns", "refuses the file store"),
        ("tracking.uri=sqlite:///{tmp}/a-file/mlflow.db", "a-file is not a directory"),
        ("tracking.uri=http://127.0.0.1:{port}", "the tracking server does not answer"),
        ("run_dir={tmp}/a-file/run", "run_dir={tmp}/a-file/run: cannot write there"),
        ("data.shards_dir={tmp}/a-file/data", "data.shards_dir={tmp}/a-file/data: cannot write"),
        ("parallel.tensor=2", "WORLD_SIZE=1 (one process: launchers/torchrun.sh"),
    ],
)
def test_checked_before_any_work(capsys, tmp_path, corpus, monkeypatch, override, needle):
    """What can be refused without the tokenizer and the data is refused first: one line, in
    well under the time of a data build, and no run directory appears."""
    import time

    if override.startswith("train.device=cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "a-file").write_text("not a directory\n")
    fill = dict(tmp=tmp_path, port=_closed_port())
    run = tmp_path / "run"
    started = time.perf_counter()
    args = train_args(run, corpus, "tracking.enabled=true", override.format(**fill))
    code, err = mtp(capsys, *args)
    assert code == 2
    one_line(err, "mtp train: ", needle.format(**fill))
    assert time.perf_counter() - started < 10  # no data build, no tokenizer training
    assert not run.exists() and not (tmp_path / "a-file" / "run").exists()


@pytest.mark.parametrize(
    "world, overrides, needle",
    [
        (2, ["parallel.tensor=4"], "world size 2 is not divisible by model-parallel size 4"),
        (
            2,
            ["parallel.pipeline=2", "parallel.zero_stage=2"],
            "pipeline engine supports ZeRO stage 0 or 1 only",
        ),
        (2, ["parallel.tensor=2", "model.n_attn_heads=1"], "model.n_attn_heads=1 is not divisible"),
    ],
)
def test_layout_is_checked_before_any_process_group(
    capsys, tmp_path, corpus, monkeypatch, world, overrides, needle
):
    """The layout against WORLD_SIZE: refused before the process group and the data work (the
    ZeRO / pipeline and the model-divisibility checks ran in the engine, after the data)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("MASTER_PORT", str(_closed_port()))  # nobody to meet: it must not try
    run = tmp_path / "run"
    bounded = "parallel.timeout_s=20"  # were the check late, rank 0 would wait for rank 1
    code, err = mtp(capsys, *train_args(run, corpus, *overrides, bounded))
    assert code == 2
    one_line(err, f"mtp train: WORLD_SIZE={world}: ", needle)
    assert not run.exists()


# -- generation limits ----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("value", ["-5", "0", "many"])
def test_max_tokens_below_one(capsys, toy, command, value):
    code, err = mtp(capsys, command, "--checkpoint", str(toy), "--max-tokens", value)
    assert code == 2
    one_line(err, f"mtp {command}: argument --max-tokens:")


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_max_tokens_beyond_the_context(capsys, toy, command):
    args = [command, "--checkpoint", str(toy), "--max-tokens", "100000", "--prompt", "x"]
    code, err = mtp(capsys, *(args if command == "generate" else args[:-2]))
    assert code == 2
    one_line(err, "--max-tokens 100000", f"model.max_seq_len={CONTEXT}", f"at most {CONTEXT - 1}")


def test_long_prompt_warns_how_much_was_dropped(capsys, toy):
    prompt, max_tokens = "x = 1\n" * 20, 10  # 120 byte tokens; 54 fit beside 10 new ones
    args = ["--checkpoint", str(toy), "--prompt", prompt, "--max-tokens", "10", "--json"]
    code = main(["generate", *args])
    assert code == 0
    warning, stats = capsys.readouterr().err.strip().splitlines()
    dropped = len(prompt) - (CONTEXT - max_tokens)
    assert warning.startswith("mtp generate: warning: ") and f"first {dropped} tokens" in warning
    assert '"tokens": 10' in stats


# -- the command line -----------------------------------------------------------------------
def test_recipe_by_name_and_a_bad_name(capsys, tmp_path):
    code, err = mtp(capsys, "train", "tiny-cpu", f"run_dir={tmp_path}", "model.n_futur=2")
    assert code == 2
    one_line(err, "model.n_futur")  # the recipe was found: the override is what failed
    code, err = mtp(capsys, "train", "tiny-gpu")
    assert code == 2
    one_line(err, "recipe 'tiny-gpu'", "tiny-cpu", "byte-n8-cpu")


def test_glob_override_is_the_pattern_typed(capsys, tmp_path):
    """`data.include=*.py` (an alias to PyYAML) includes *.py: here it is what finds no file."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.txt").write_text("not python\n")
    source, run = f"data.source={tmp_path / 'corpus'}", f"run_dir={tmp_path / 'run'}"
    code, err = mtp(capsys, "train", "tiny-cpu", run, source, "data.include=*.py")
    assert code == 2
    one_line(err, "mtp train: data.source=", "no files matching *.py")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["model.d_model=[1,2", "model.d_model=abc", "run_dir="])
def test_unreadable_override_values_are_one_line(capsys, tmp_path, override):
    """What no reading of the value fits is one line naming the key, not PyYAML's traceback."""
    key = override.partition("=")[0]
    code, err = mtp(capsys, "train", "tiny-cpu", f"run_dir={tmp_path / 'run'}", override)
    assert code == 2
    one_line(err, f"mtp train: {key}: ")
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line(capsys):
    code, err = mtp(capsys, "generate", "--bogus")
    assert code == 2
    one_line(err, "mtp generate: the following arguments are required: --checkpoint")
    code, err = mtp(capsys, "train", "tiny-cpu", "--resume", "--bogus")
    assert code == 2
    one_line(err, "unrecognized arguments: --bogus")


def test_debug_shows_the_traceback_and_bugs_keep_theirs(capsys, monkeypatch):
    monkeypatch.setenv("MTP_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "tiny-gpu"])
    monkeypatch.delenv("MTP_DEBUG")

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("mtp_dist.cli.load_config", bug)
    with pytest.raises(KeyError):
        main(["train"])


def test_default_recipe_anywhere_without_heavy_imports(tmp_path):
    """From a directory without configs/, `mtp train` finds its default recipe, and a config
    error costs no torch import."""
    code = (
        "import sys; from mtp_dist.cli import main; rc = main(['train', 'model.n_futur=2']); "
        "print(rc, sorted({'torch', 'deepspeed', 'mlflow', 'megatron'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.stdout.strip() == "2 []", proc.stderr
    one_line(proc.stderr, "mtp train: model.n_futur")


def test_eval_default_max_tokens_fits_a_small_model(capsys, toy, tmp_path):
    """The default completion length (256) is halved to fit a model of 64 positions, rather
    than refused: only an explicit --max-tokens beyond the context is an error."""
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(toy), "--benchmark", "mbpp", "--limit", "1"]
    code = main([*args, "--samples", "0", "--no-mlflow", "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["config"]["max_tokens"] == CONTEXT // 2


def test_unusable_tokenizer_is_one_line(capsys, toy, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy, run)
    (meta,) = run.glob("checkpoints/*/tokenizer/tokenizer.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "kind": "wordpiece"}))
    code, err = mtp(capsys, "generate", "--checkpoint", str(run), "--prompt", "x")
    assert code == 2
    one_line(err, "mtp generate: ", "unknown tokenizer kind 'wordpiece'")


@pytest.mark.parametrize("flag, value", [("--jobs", "0"), ("--jobs", "two"), ("--seeds", "-1")])
def test_repro_counts_must_be_whole_and_positive(capsys, tmp_path, flag, value):
    out = tmp_path / "study"
    code, err = mtp(capsys, "repro", "induction", flag, value, "--out", str(out), "--no-docs")
    assert code == 2
    one_line(err, flag, value)
    assert not out.exists()
