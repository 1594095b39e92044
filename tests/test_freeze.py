"""train.freeze in one process: what is frozen, that it stays exactly as it was, that the rest
trains with the gradients it would have had anyway, that the frozen trunk is not
backpropagated, and checkpoints / resume. The distributed layouts are in tests/distributed
(layouts.FREEZE)."""

from __future__ import annotations

import pytest
import torch

from mtp_dist.config import load_config
from mtp_dist.model import MTPModel, parameter_table
from mtp_dist.training.engine import LocalEngine
from mtp_dist.training.freeze import apply_freeze, frozen_names

MODES = ("none", "trunk", "trunk_and_head1")
MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 6, "n_attn_heads": 4, "n_future": 4,
         "ffn_hidden": 64, "max_seq_len": 16}  # fmt: skip
SEQ = 8


def make_cfg(*overrides: str):
    over = ["run_dir=/tmp/unused", f"data.seq_len={SEQ}", "train.lr=0.01", "train.warmup_steps=0"]
    over += [f"model.{k}={v}" for k, v in MODEL.items()]
    over += ["train.precision=fp64", "train.device=cpu", "train.grad_accum_steps=2", *overrides]
    return load_config(None, over)


def make_engine(cfg, seed: int = 0) -> LocalEngine:
    torch.manual_seed(seed)
    return LocalEngine(MTPModel(cfg.model), cfg.train, cfg.data.seq_len)


def batches(steps: int, rows: int = 2) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    width = SEQ + MODEL["n_future"]
    return [[torch.randint(0, 64, (rows, width), generator=g) for _ in range(2)]
            for _ in range(steps)]  # fmt: skip


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_names_follow_the_owners(tied: bool) -> None:
    cfg = make_cfg(f"model.tie_embeddings={tied}")
    table = parameter_table(cfg.model)
    owners = {mode: {str(table[n].owner) for n in frozen_names(cfg.model, mode)} for mode in MODES}
    trunk = {"embed"} | {f"trunk {k}" for k in range(cfg.model.trunk_layers)}
    assert owners == {
        "none": set(),
        "trunk": trunk,
        "trunk_and_head1": trunk | {"head 0", "unembed"},
    }
    # The unembedding's projection is the embedding's matrix when tied: frozen with the trunk.
    assert ("heads.unembed__proj__weight" in table) is not tied
    assert "heads.unembed__norm__weight" not in frozen_names(cfg.model, "trunk")
    with pytest.raises(ValueError, match="train.freeze='all'"):
        frozen_names(cfg.model, "all")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_stay_exact_and_the_rest_trains(mode: str, tied: bool) -> None:
    cfg = make_cfg(f"train.freeze={mode}", f"model.tie_embeddings={tied}", "train.weight_decay=0.1")
    engine = make_engine(cfg)
    frozen = frozen_names(cfg.model, mode)
    start = snapshot(engine.model)
    for micro in batches(3):
        engine.train_step(micro)
    params = dict(engine.model.named_parameters())
    for name, p in params.items():
        if name in frozen:  # no gradient, no update, no weight decay: bit for bit
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, start[name]), name
        else:
            assert p.grad is not None, name
            assert not torch.equal(p, start[name]), name
    # AdamW holds state (and groups) for the trainable parameters only.
    trainable = {id(p) for n, p in params.items() if n not in frozen}
    assert {id(p) for p in engine.optimizer.state} == trainable
    assert {id(p) for g in engine.optimizer.param_groups for p in g["params"]} == trainable
    numel = sum(p.numel() for n, p in params.items() if n in frozen)
    assert (engine.freeze.frozen, engine.freeze.trainable) == (
        numel,
        sum(p.numel() for p in params.values()) - numel,
    )


@pytest.mark.parametrize(
    "loss", [("sequential", 0), ("naive", 0), ("sequential", 6), ("naive", 6)], ids=str
)
@pytest.mark.parametrize("mode", ["trunk", "trunk_and_head1"])
def test_freezing_leaves_the_other_gradients_unchanged(mode: str, loss: tuple) -> None:
    """First step, float64, no clipping: the loss and every trainable parameter's gradient equal
    the unfrozen model's (freezing changes which parameters update, not what they see)."""
    impl, chunk = loss
    common = (f"model.loss_impl={impl}", f"model.loss_chunk={chunk}", "train.grad_clip=0")
    plain, frozen = (
        make_engine(make_cfg(*common)),
        make_engine(make_cfg(*common, f"train.freeze={mode}")),
    )
    micro = batches(1)[0]
    m_plain, m_frozen = plain.train_step(micro), frozen.train_step(micro)
    assert m_frozen.head_losses == m_plain.head_losses  # the same forward, bit for bit
    want = dict(plain.model.named_parameters())
    for name, p in frozen.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-12, atol=1e-15, msg=name)


def test_trunk_and_head1_keeps_the_next_token_model_bit_identical() -> None:
    engine = make_engine(make_cfg("train.freeze=trunk_and_head1"))
    probe = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(9))
    before = engine.model.next_token_logits(probe)
    losses = [engine.train_step(micro).head_losses for micro in batches(4)]
    assert torch.equal(engine.model.next_token_logits(probe), before)
    assert losses[-1][1:] != losses[0][1:]  # heads 2..n did train


def trunk_activity(engine: LocalEngine) -> tuple[int, int]:
    """(tensors the trunk layers save for backward, trunk layer backward calls) in one step."""
    saved, backward, inside = [], [], [False]
    for block in engine.model.trunk:
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
        block.register_full_backward_hook(lambda *_: backward.append(1))

    def pack(t):
        if inside[0]:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.train_step(batches(1)[0])
    return len(saved), len(backward)


@pytest.mark.parametrize("impl", ["sequential", "naive"])
def test_a_frozen_trunk_is_not_backpropagated(impl: str) -> None:
    """Under 'trunk' the trunk keeps no activations for backward and its backward never runs;
    without a freeze it does both (so the probes see them when they happen)."""
    plain = trunk_activity(make_engine(make_cfg(f"model.loss_impl={impl}")))
    frozen = trunk_activity(make_engine(make_cfg("train.freeze=trunk", f"model.loss_impl={impl}")))
    assert min(plain) > 0 and frozen == (0, 0), (plain, frozen)


@pytest.mark.parametrize("mode", ["trunk", "trunk_and_head1"])
def test_checkpoint_holds_the_whole_model_and_resumes_exactly(mode: str, tmp_path) -> None:
    cfg = make_cfg(f"train.freeze={mode}")
    data = batches(4)
    straight = make_engine(cfg)
    straight_losses = [straight.train_step(micro).head_losses for micro in data]
    first = make_engine(cfg)
    for micro in data[:2]:
        first.train_step(micro)
    first.save(tmp_path)
    saved = torch.load(tmp_path / "model.pt")
    assert set(saved) == set(parameter_table(cfg.model))  # frozen ones included
    # A fresh engine from other random weights: the load must restore the frozen ones too.
    resumed = make_engine(cfg, seed=1)
    resumed.load(tmp_path)
    assert [resumed.train_step(micro).head_losses for micro in data[2:]] == straight_losses[2:]
    after = dict(resumed.model.named_parameters())
    for name in frozen_names(cfg.model, mode):
        assert torch.equal(after[name], saved[name]) and not after[name].requires_grad, name


def test_apply_freeze_rejects_a_name_outside_the_table() -> None:
    cfg = make_cfg()
    model = MTPModel(cfg.model)
    model.register_parameter("stray", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="'stray' is not in the model's parameter table"):
        apply_freeze(model, cfg.model, "trunk")


def test_trainer_reports_the_counts_and_refuses_another_freeze_on_resume(tmp_path, capsys):
    import math
    import sysconfig
    from pathlib import Path

    from mtp_dist.training import Trainer, TrainingAborted

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        (corpus / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    recipe = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"

    def cfg(mode: str, steps: int):
        return load_config(recipe, [
            f"run_dir={tmp_path / 'run'}", f"data.source={corpus}", "data.tokenizer=bytes",
            "data.seq_len=16", "data.val_fraction=0.2", "model.d_model=16", "model.n_layers=3",
            "model.n_attn_heads=2", "model.n_future=2", "model.max_seq_len=32",
            "train.micro_batch_size=2", "train.grad_accum_steps=1", f"train.max_steps={steps}",
            "train.warmup_steps=0", "train.eval_every=0", "train.ckpt_every=2",
            "tracking.enabled=false", f"train.freeze={mode}",
        ])  # fmt: skip

    trainer = Trainer(cfg("trunk", 2))
    trainer.fit()
    table = parameter_table(trainer.cfg.model)
    frozen = sum(math.prod(table[n].shape) for n in frozen_names(trainer.cfg.model, "trunk"))
    total = sum(math.prod(s.shape) for s in table.values())
    assert (
        f"parameters: {total:,} ({total - frozen:,} train, {frozen:,} frozen: train.freeze=trunk)"
        in capsys.readouterr().out
    )
    with pytest.raises(TrainingAborted) as err:
        Trainer(cfg("none", 4), resume=True)
    message = str(err.value)
    assert "train.freeze=none differs from the checkpoint's train.freeze=trunk" in message
    assert "\n" not in message
    Trainer(cfg("trunk", 4), resume=True).fit()  # the same freeze resumes


def test_zero3_refuses_a_head_parallel_rank_with_nothing_to_train() -> None:
    from mtp_dist.config import ConfigError

    over = ("train.freeze=trunk_and_head1", "parallel.head=2", "parallel.zero_stage=3")
    with pytest.raises(ConfigError, match="train.freeze") as err:
        make_cfg(*over, "model.n_future=2")
    assert "\n" not in str(err.value)
    make_cfg(*over)  # n_future=4: the rank of head 1 trains head 2
    make_cfg(*over[:2], "parallel.zero_stage=2", "model.n_future=2")  # the placeholder path
