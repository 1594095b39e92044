"""`train.recompute` (activation recompute of the trunk layers), single process, float64.

The distributed layouts with recompute (TP, SP, PP, head parallelism, ZeRO 1/2/3) are compared
with the single-process reference in tests/distributed (layouts.OPTIONS)."""

from __future__ import annotations

import copy

import pytest
import torch

from mtp_dist.config import ConfigError, ModelConfig, TrainConfig, load_config
from mtp_dist.model import MTPModel, split_window
from mtp_dist.training.engine import LocalEngine, apply_recompute

V = 61


def model(loss_impl: str = "sequential", loss_chunk: int = 0) -> MTPModel:
    torch.manual_seed(1234)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=7, n_attn_heads=4, n_future=4,
                      max_seq_len=64, loss_impl=loss_impl, loss_chunk=loss_chunk)  # fmt: skip
    return MTPModel(cfg).double()  # 3 trunk layers + 4 heads


def batch(T: int = 12, B: int = 3):
    window = torch.randint(0, V, (B, T + 4), generator=torch.Generator().manual_seed(0))
    return split_window(window, T)


def gradients(m: MTPModel, scale: float = 0.37) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    (m(*batch()).loss * scale).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("loss_impl, loss_chunk", [("sequential", 0), ("naive", 0),
                                                   ("sequential", 7)])  # fmt: skip
def test_recompute_gradients_equal_no_recompute(mode, loss_impl, loss_chunk):
    plain = model(loss_impl, loss_chunk)
    recomputed = copy.deepcopy(plain)
    assert apply_recompute(recomputed, mode) == 3
    # forward hooks: the parameters keep their names, the state dict its keys
    assert [n for n, _ in recomputed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    want, got = gradients(plain), gradients(recomputed)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=0, msg=name)
        assert g.abs().max() > 0, name


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_sequential_loss_runs_the_trunk_backward_once(mode):
    """Recompute re-runs the chosen trunk modules' forward inside the one backward; the trunk
    itself is still backpropagated once per micro-step (not once per head), and the heads'
    forward runs once."""
    m = model("sequential")
    apply_recompute(m, mode)
    calls = {"block": 0, "mlp": 0, "heads": 0, "trunk_grad": 0, "embed_grad": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    m.trunk[0].register_forward_pre_hook(count("block"))
    m.trunk[0].mlp.register_forward_pre_hook(count("mlp"))
    m.heads.register_forward_pre_hook(count("heads"))
    m.trunk[0].attn.wq.weight.register_hook(count("trunk_grad"))
    m.embed.weight.register_hook(count("embed_grad"))
    m(*batch()).loss.backward()
    block, mlp = {"none": (1, 1), "selective": (1, 2), "full": (2, 2)}[mode]
    assert calls == {"block": block, "mlp": mlp, "heads": 1, "trunk_grad": 1, "embed_grad": 1}


def saved_bytes(m: MTPModel) -> int:
    """Bytes the forward keeps for backward, parameters aside (each storage counted once)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(*batch(T=32))
    return sum(storages.values())


def test_recompute_keeps_less_for_backward():
    """Trunk activations kept for backward: full < selective < none (the heads' are handed
    out inside the sequential loss's forward either way)."""
    kept = {}
    for mode in ("none", "selective", "full"):
        m = model("naive")  # one graph: every activation is saved by the forward
        apply_recompute(m, mode)
        kept[mode] = saved_bytes(m)
    assert kept["full"] < kept["selective"] < kept["none"], kept


def test_engine_applies_the_config_and_the_config_checks_it():
    cfg = TrainConfig(recompute="full", precision="fp64", device="cpu")
    engine = LocalEngine(model(), cfg, seq_len=12)
    assert engine.recomputed == 3
    assert LocalEngine(model(), TrainConfig(device="cpu"), seq_len=12).recomputed == 0
    with pytest.raises(ConfigError, match="train.recompute"):
        load_config(None, ["run_dir=/tmp/unused", "train.recompute=layers"])
