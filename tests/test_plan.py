"""`mtp plan` (mtp_dist/plan.py): the formulas on hand-computed cases, agreement with
DeepSpeed's model-states estimators and its pipeline partition, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from mtp_dist.config import load_config
from mtp_dist.plan import (
    DS_REDUCE_BUCKET,
    LOGIT_COPIES,
    Layout,
    bucket_bytes,
    flops_per_token,
    layer_activation_elements,
    megatron_layer_activation_bytes,
    model_state_bytes,
    param_counts,
    plan_layout,
    rank_params,
    stage_layers,
)

SMALL = ["run_dir=x", "model.vocab_size=512", "model.d_model=64", "model.n_attn_heads=2",
         "model.ffn_hidden=128", "model.n_layers=6", "model.n_future=2", "data.seq_len=32",
         "model.max_seq_len=64"]


def small(*more: str):
    return load_config(None, [*SMALL, *more])


def test_layer_activations_hand_counted():
    cfg = small()  # d 64, f 128, 2 attention heads, kv = d
    # norms 6d + 2 rsqrt; attention 3d + 2 dkv + 2 lse; MLP 4f
    assert layer_activation_elements(cfg, Layout(), "none") == 386 + 322 + 512
    assert layer_activation_elements(cfg, Layout(), "selective") == 386 + 322
    assert layer_activation_elements(cfg, Layout(), "full") == 64
    tp = Layout(tensor=2)
    assert layer_activation_elements(cfg, tp, "none") == 386 + 161 + 256
    sp = Layout(tensor=2, sequence_parallel=True)
    assert layer_activation_elements(cfg, sp, "none") == 193 + 161 + 256
    gqa = small("model.n_kv_heads=1")  # dkv = 32
    assert layer_activation_elements(gqa, Layout(), "none") == 386 + (192 + 64 + 2) + 512


def _saved_bytes(module, *inputs) -> int:
    """Bytes of the distinct tensors autograd saves for backward in module(*inputs), not
    counting parameters and the rotary tables (they live outside the step)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    outside = {p.untyped_storage().data_ptr() for p in module.parameters()}
    outside |= {t.untyped_storage().data_ptr() for t in inputs[1:]}
    return sum(n for ptr, n in saved.items() if ptr not in outside)


@pytest.mark.parametrize("kv", [0, 1])
def test_layer_activations_equal_what_autograd_saves(kv):
    """The plan's per-layer count against torch itself: the tensors a Block saves."""
    from mtp_dist.model.layers import Block, LocalLayers, rotary_tables

    cfg = small(f"model.n_kv_heads={kv}")
    m, B, T = cfg.model, 4, 32
    block = Block(m.d_model, m.n_attn_heads, m.ffn_width, m.norm_eps, LocalLayers(0.02),
                  m.kv_heads)  # fmt: skip
    cos, sin = rotary_tables(m.d_model // m.n_attn_heads, T, m.rope_theta)
    x = torch.randn(B, T, m.d_model, requires_grad=True)
    assert _saved_bytes(block, x, cos, sin) == layer_activation_elements(
        cfg, Layout(), "none"
    ) * B * T * 4


def test_heads_logit_copies_measured():
    """The sequential loss holds LOGIT_COPIES vocabulary-sized tensors per token at its peak
    (the plan's heads term): the growth of the measured peak of live tensors when V doubles."""
    from mtp_dist.model import MTPModel
    from mtp_dist.training.memory import allocated_peak

    torch.set_num_threads(1)

    def peak(v: int) -> int:
        cfg = small(f"model.vocab_size={v}", "model.n_layers=5", "model.n_future=4")
        torch.manual_seed(0)
        model = MTPModel(cfg.model)
        ids = torch.randint(1, v, (4, 36))
        step = lambda: model(ids[:, :32], ids[:, 1:]).loss.backward()  # noqa: E731
        step()  # gradients exist from here on, as in training
        return allocated_peak(step)

    # 2048 more vocabulary entries: LOGIT_COPIES per token, and one more row of the
    # unembedding weight's gradient per entry (made before it is accumulated), fp32
    tokens, d = 4 * 32, 64
    expected = (LOGIT_COPIES * tokens + d) * 2048 * 4
    assert peak(4096) - peak(2048) == pytest.approx(expected, rel=0.03)


def test_deepspeed_gradient_bucket():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert DS_REDUCE_BUCKET == DeepSpeedZeroConfig().reduce_bucket_size
    assert bucket_bytes(Layout(data=2, zero_stage=1), bf16=True) == 4 * DS_REDUCE_BUCKET
    assert bucket_bytes(Layout(data=2, zero_stage=2), bf16=True) == 2 * DS_REDUCE_BUCKET
    assert bucket_bytes(Layout(data=2, zero_stage=3), bf16=True) == 0
    assert bucket_bytes(Layout(), bf16=False) == 0  # one process: LocalEngine


def test_megatron_anchor_formula():
    # s=2, b=1, h=4, a=2: s·b·h = 8; 5·a·s/h = 5
    assert megatron_layer_activation_bytes(2, 1, 4, 2) == 8 * 39
    assert megatron_layer_activation_bytes(2, 1, 4, 2, selective=True) == 8 * 34
    assert megatron_layer_activation_bytes(2, 1, 4, 2, t=2, sp=True) == 8 * 39 / 2
    assert megatron_layer_activation_bytes(2, 1, 4, 2, t=2) == 8 * (10 + 29 / 2)


@pytest.mark.parametrize("gpus", [8, 64])
def test_model_states_agree_with_deepspeed_estimators(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config("code-7b-n4", ["parallel.tensor=1", "parallel.sequence_parallel=false"])
    counts = param_counts(cfg)
    p = counts.total - counts.total % gpus  # DeepSpeed rounds P/N down once, the plan per term
    z2 = model_state_bytes(p, Layout(data=gpus, zero_stage=2), True, counts.largest_layer)
    _, want2 = estimate_zero2_model_states_mem_needs(p, gpus, 1, cpu_offload=False)
    assert sum(z2.values()) == want2
    z3 = model_state_bytes(p, Layout(data=gpus, zero_stage=3), True, counts.largest_layer)
    _, want3, _ = estimate_zero3_model_states_mem_needs(
        p, counts.largest_layer, gpus, 1, cpu_offload=False, cpu_offload_params=False
    )
    assert sum(z3.values()) == want3


def test_param_counts_are_the_models():
    import torch

    from mtp_dist.model import MTPModel

    cfg = small()
    model = MTPModel(cfg.model)
    want = sum(p.numel() for p in model.parameters())
    assert param_counts(cfg).total == want
    assert rank_params(cfg, Layout(), 0) == want
    assert sum(rank_params(cfg, Layout(pipeline=3, data=1), s) for s in range(3)) == want
    # tensor 2: every weight halved but the norms (2 per layer, the final one)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert rank_params(cfg, Layout(tensor=2), 0) == (want - norms) // 2 + norms
    # head 2: one of the two heads' layers per rank
    assert rank_params(cfg, Layout(head=2), 0) == want - param_counts(cfg).head_layer
    del torch


@pytest.mark.parametrize("items,parts", [(6, 2), (7, 3), (3, 4), (30, 8)])
def test_stages_cut_as_deepspeed_cuts(items, parts):
    from deepspeed.runtime.utils import partition_uniform

    bounds = partition_uniform(items, parts)
    got = stage_layers(items - 2, parts)
    for s, (embed, trunk, heads) in enumerate(got):
        lo, hi = bounds[s], bounds[s + 1]
        assert embed == (lo == 0 < hi)
        assert heads == (hi == items > lo)
        assert trunk == hi - lo - embed - heads


def test_flops_count_heads_and_unembedding_n_times():
    from mtp_dist.model import parameter_table

    cfg = small()
    table = parameter_table(cfg.model)
    n, s, d = cfg.model.n_future, cfg.data.seq_len, cfg.model.d_model
    matmul = sum(math.prod(p.shape) * (n if p.owner.kind == "unembed" else 1)
                 for p in table.values() if p.role != "norm" and p.owner.kind != "embed")
    layers = cfg.model.trunk_layers + n
    assert flops_per_token(cfg, param_counts(cfg))["model"] == 6 * matmul + 12 * s * d * layers


def test_pipeline_stage_holds_in_flight_micro_batches():
    cfg = small("train.grad_accum_steps=8")
    plan = plan_layout(cfg, Layout(pipeline=2), float("inf"), param_counts(cfg))
    assert [r.in_flight for r in plan.ranks] == [2, 1]
    one = plan_layout(
        small("train.grad_accum_steps=1"), Layout(pipeline=2), 1e18, param_counts(cfg)
    )
    assert [r.in_flight for r in one.ranks] == [1, 1]


def test_sequential_chunked_naive_heads_order():
    peaks = {}
    for name, over in {"naive": ["model.loss_impl=naive"], "sequential": [],
                       "chunked": ["model.loss_chunk=64"]}.items():
        cfg = small("train.micro_batch_size=8", *over)
        peaks[name] = plan_layout(cfg, Layout(), 1e18, param_counts(cfg)).ranks[0].heads
    assert peaks["chunked"] < peaks["sequential"] < peaks["naive"]


def mtp(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtp_dist.cli", "plan", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_json_keys():
    out = mtp("code-7b-n4", "--gpus", "64", "--gpu-memory-gb", "80", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    for key in ("params_total", "tokens_per_step", "flops_per_token", "step_seconds",
                "tokens_per_day", "days_to_budget", "layout", "candidates", "hardware"):
        assert key in plan, key
    rank = plan["layout"]["ranks"][0]
    for key in ("weights", "gradients", "optimizer", "activations", "heads", "total"):
        assert rank[key] > 0, key
    assert plan["layout"]["fits"] is True


def test_cli_reports_a_layout_that_does_not_fit():
    out = mtp("code-7b-n4", "--gpus", "8", "--gpu-memory-gb", "1", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["layout"]["fits"] is False
    assert plan["layout"]["peak_bytes"] > 1e9
    text = mtp("code-7b-n4", "--gpus", "8", "--gpu-memory-gb", "1")
    assert "fits: NO" in text.stdout


@pytest.mark.parametrize(
    "args,words",
    [
        (["tiny-cpu", "--gpus", "0", "--gpu-memory-gb", "8"], "must be > 0"),
        (["tiny-cpu", "parallel.tensor=2", "--gpus", "3", "--gpu-memory-gb", "8"], "divisible"),
        (["tiny-cpu", "model.nope=1", "--gpus", "2", "--gpu-memory-gb", "8"], "model.nope"),
        (["tiny-cpu", "--gpu-memory-gb", "8"], "--gpus"),
        (["tiny-cpu", "--gpus", "2", "--gpu-memory-gb", "8", "--mfu", "2"], "--mfu"),
    ],
)
def test_cli_errors_are_one_line(args, words):
    out = mtp(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr
