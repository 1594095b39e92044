"""Config schema: every recipe loads and validates; bad input fails in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtp_dist.config import ConfigError, load_config, to_flat_dict

RECIPES = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


def test_there_are_recipes():
    names = {p.stem for p in RECIPES}
    assert {"tiny-cpu", "byte-n8-cpu", "code-7b-n4", "code-13b-n4"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.model.trunk_layers >= 0
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert "model.n_future" in to_flat_dict(cfg)


def test_paper_code_settings():
    for name in ("code-7b-n4", "code-13b-n4"):
        cfg = load_config(f"configs/{name}.yaml")
        t = cfg.train
        assert cfg.model.n_future == 4 and cfg.data.seq_len == 4096
        assert (t.beta1, t.beta2, t.weight_decay, t.lr, t.grad_clip) == (0.9, 0.95, 0.1, 3e-4, 1.0)


def test_overrides_apply():
    cfg = load_config("configs/tiny-cpu.yaml", ["model.n_future=2", "train.lr=0.5"])
    assert cfg.model.n_future == 2 and cfg.train.lr == 0.5


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("data.include=*.py", "data.include", ["*.py"]),  # YAML reads `*` as an alias
        ("data.include=[*.py, *.pyi]", "data.include", ["*.py", "*.pyi"]),
        ("data.include=['**/*.jsonl']", "data.include", ["**/*.jsonl"]),  # mtp repro's
        ("data.include=[a, b]", "data.include", ["a", "b"]),
        ("run_dir=yes", "run_dir", "yes"),  # not 'True'
        ("run_dir=1e-3", "run_dir", "1e-3"),  # not '0.001'
        ("run_dir=runs/a: b", "run_dir", "runs/a: b"),  # not a dict
        ("run_dir=!x", "run_dir", "!x"),  # not a YAML tag
        ("run_dir='a b'", "run_dir", "a b"),  # YAML quoting still works
        ("tracking.uri=null", "tracking.uri", None),
        ("tracking.uri=", "tracking.uri", None),
        ("train.lr=1e-3", "train.lr", 1e-3),
        ("parallel.sequence_parallel=false", "parallel.sequence_parallel", False),
        ("model.rope_scaling={type: llama3}", "model.rope_scaling.type", "llama3"),
    ],
)
def test_override_values_mean_what_was_typed(override, key, expected):
    """YAML first; the text as typed when YAML cannot read it or reads the wrong type."""
    cfg = load_config("configs/tiny-cpu.yaml", [override])
    assert to_flat_dict(cfg)[key] == expected


@pytest.mark.parametrize(
    "override, key",
    [
        (["model.d_model=[1,2"], "model.d_model"),  # YAML cannot read it, nor is it an int
        (["model.d_model=abc"], "model.d_model"),
        (["model.d_model=[1, 2]"], "model.d_model"),
        (["model.d_model="], "model.d_model"),
        (["run_dir="], "run_dir"),  # '' would be the current directory
        (["data.include="], "data.include"),
        (["model.not_a_key=1"], "model.not_a_key"),
        (["train.max_steps=lots"], "train.max_steps"),
        (["model.n_future=0"], "model.n_future"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["model.n_layers=3"], "model.n_layers"),
        (["model.loss_impl=fast"], "model.loss_impl"),
        (["model.d_model=250"], "model.d_model"),
        (["parallel.zero_stage=4"], "parallel.zero_stage"),
        (["train.lr"], "train.lr"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),  # tensor = 1
        (
            ["parallel.sequence_parallel=true", "parallel.tensor=2", "parallel.head=2"],
            "parallel.sequence_parallel",
        ),
        (["parallel.sequence_parallel=true", "parallel.tensor=3"], "parallel.sequence_parallel"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny-cpu.yaml", override)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_missing_recipe_and_missing_run_dir():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="run_dir"):
        load_config(None)


def test_written_configs_name_the_code_that_wrote_them():
    from mtp_dist.config import to_yaml
    from mtp_dist.version import version_string

    text = to_yaml(load_config("configs/tiny-cpu.yaml"))
    assert text.splitlines()[0] == f"# written by {version_string()}"
    assert "mtp_dist" in text.splitlines()[0] and "(git " in text.splitlines()[0]
