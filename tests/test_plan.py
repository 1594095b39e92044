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
from mtp_dist.plan_params import rank_param_counts

SMALL = [
    "run_dir=x",
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_attn_heads=2",
    "model.ffn_hidden=128",
    "model.n_layers=6",
    "model.n_future=2",
    "data.seq_len=32",
    "model.max_seq_len=64",
]


def small(*more: str):
    return load_config(None, [*SMALL, *more])


# An imported model's shape: head_dim 16 != d / H = 32 (q and o 32 wide, k and v 16 wide:
# GQA), q/k/v biases; TIED adds tied embeddings (pipeline 1, head 1 only).
HF = ["model.head_dim=16", "model.n_kv_heads=1", "model.attn_bias=true"]
TIED = [*HF, "model.tie_embeddings=true"]
FREEZE_MODES = ["none", "trunk", "trunk_and_head1"]


def test_layer_activations_hand_counted():
    cfg = small()  # d 64, f 128, 2 attention heads, kv = d
    # norms 6d + 2 rsqrt; attention 3 dq + 2 dkv + 2 lse; MLP 4f
    assert layer_activation_elements(cfg, Layout(), "none") == 386 + 322 + 512
    assert layer_activation_elements(cfg, Layout(), "selective") == 386 + 322
    assert layer_activation_elements(cfg, Layout(), "full") == 64
    tp = Layout(tensor=2)
    assert layer_activation_elements(cfg, tp, "none") == 386 + 161 + 256
    sp = Layout(tensor=2, sequence_parallel=True)
    assert layer_activation_elements(cfg, sp, "none") == 193 + 161 + 256
    gqa = small("model.n_kv_heads=1")  # dkv = 32
    assert layer_activation_elements(gqa, Layout(), "none") == 386 + (192 + 64 + 2) + 512
    hf = small(*HF)  # dq = 2 x 16, dkv = 16: attention 96 + 32 + 2
    assert layer_activation_elements(hf, Layout(), "none") == 386 + 130 + 512


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


@pytest.mark.parametrize("over", [[], ["model.n_kv_heads=1"], HF])
def test_layer_activations_equal_what_autograd_saves(over):
    """The plan's per-layer count against torch itself: the tensors a Block saves."""
    from mtp_dist.model.layers import LocalLayers, rotary_tables
    from mtp_dist.model.transformer import make_block

    cfg = small(*over)
    m, B, T = cfg.model, 4, 32
    block = make_block(m, LocalLayers(0.02))
    cos, sin = rotary_tables(m.attn_head_dim, T, m.rope_theta)
    x = torch.randn(B, T, m.d_model, requires_grad=True)
    assert (
        _saved_bytes(block, x, cos, sin)
        == layer_activation_elements(cfg, Layout(), "none") * B * T * 4
    )


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


@pytest.mark.parametrize("over", [[], HF, TIED], ids=["plain", "hf", "tied"])
def test_param_counts_are_the_models(over):
    from mtp_dist.model import MTPModel, parameter_table

    cfg = small(*over)
    model = MTPModel(cfg.model)
    want = sum(p.numel() for p in model.parameters())
    assert param_counts(cfg).total == want
    assert sum(math.prod(p.shape) for p in parameter_table(cfg.model).values()) == want
    assert rank_params(cfg, Layout(), 0) == want
    # tensor 2: every weight (biases too) halved but the norms (2 per layer, the final one)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert rank_params(cfg, Layout(tensor=2), 0) == (want - norms) // 2 + norms
    if cfg.model.tie_embeddings:  # one V x d matrix, and the layouts that cannot tie refused
        assert "heads.unembed__proj__weight" not in parameter_table(cfg.model)
        assert param_counts(cfg).unembed == cfg.model.d_model  # the final norm alone
        for lay in (Layout(pipeline=2), Layout(head=2)):
            assert "tied" in plan_layout(cfg, lay, 1e18, param_counts(cfg)).error
        return
    assert sum(rank_params(cfg, Layout(pipeline=3, data=1), s) for s in range(3)) == want
    # head 2: one of the two heads' layers per rank
    assert rank_params(cfg, Layout(head=2), 0) == want - param_counts(cfg).head_layer


def _frozen_model(cfg):
    """The real model of `cfg` with train.freeze applied as training applies it."""
    from mtp_dist.model import MTPModel
    from mtp_dist.training.freeze import apply_freeze

    model = MTPModel(cfg.model)
    apply_freeze(model, cfg.model, cfg.train.freeze)
    return model


@pytest.mark.parametrize("over", [HF, TIED], ids=["hf", "tied"])
@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_trainable_counts_are_what_requires_grad(over, mode):
    cfg = small(*over, f"train.freeze={mode}")
    model = _frozen_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert param_counts(cfg).trainable == trains
    assert rank_param_counts(cfg, Layout(), 0) == (total, trains)
    # tensor 2: what trains is halved but the norms, as what is held
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and p.requires_grad)
    assert rank_param_counts(cfg, Layout(tensor=2), 0)[1] == (trains - norms) // 2 + norms
    if mode == "trunk_and_head1" and not cfg.model.tie_embeddings:
        # head 2 over n_future 2: the worst rank is head 2's (head 1's rank trains nothing)
        head = param_counts(cfg).head_layer
        assert rank_param_counts(cfg, Layout(head=2), 0) == (total - head, head)


@pytest.mark.parametrize(
    "lay,bf16,rate",
    [
        (Layout(), True, 4 + 8),  # one process: fp32 gradients and two moments
        (Layout(data=2), False, 4 + 8),  # ZeRO 0, fp32
        (Layout(data=2), True, (2 + 4) + (8 + 4)),  # ZeRO 0, bf16: + fp32 gradient, master
        (Layout(data=2, zero_stage=1), True, 2 + 4 / 2 + 12 / 2),
        (Layout(data=2, zero_stage=2), True, (2 + 4) / 2 + 12 / 2),
    ],
)
def test_frozen_parameters_have_no_gradient_or_optimizer_bytes(lay, bf16, rate):
    """Frozen parameters keep their weights; the model states are smaller by exactly their
    gradient + optimizer bytes (per parameter as in the table of docs/plan.md)."""
    prec = "train.precision=" + ("bf16" if bf16 else "fp32")
    none = plan_layout(small(*HF, prec), lay, 1e18, param_counts(small(*HF, prec)))
    cfg = small(*HF, prec, "train.freeze=trunk_and_head1")
    counts = param_counts(cfg)
    frozen = counts.total - counts.trainable
    a, b = none.ranks[0], plan_layout(cfg, lay, 1e18, counts).ranks[0]
    assert a.weights == b.weights
    assert (a.gradients + a.optimizer) - (b.gradients + b.optimizer) == rate * frozen
    # ZeRO 3: as ZeRO 2 sharded, and the whole gradient it makes is the largest trainable
    # module's (a head layer), not the embedding's
    z3 = Layout(data=2, zero_stage=3)
    a = plan_layout(small(*HF, "train.precision=bf16"), z3, 1e18, param_counts(small(*HF)))
    cfg = small(*HF, "train.precision=bf16", "train.freeze=trunk_and_head1")
    b = plan_layout(cfg, z3, 1e18, counts).ranks[0]
    assert a.ranks[0].weights == b.weights
    assert counts.largest_trainable == counts.head_layer < counts.largest_layer
    drop = 16 * frozen // 2 + 2 * (counts.largest_layer - counts.head_layer)
    assert (a.ranks[0].gradients + a.ranks[0].optimizer) - (b.gradients + b.optimizer) == drop


@pytest.mark.parametrize("mode", ["trunk", "trunk_and_head1"])
def test_frozen_trunk_keeps_no_activations(mode):
    """Planned: no trunk activations, no trunk backward, at any pipeline stage."""
    for over, lay in ([HF, Layout(pipeline=2, data=1)], [TIED, Layout(recompute="selective")]):
        trains = small(*over)
        ranks = plan_layout(trains, lay, 1e18, param_counts(trains)).ranks
        assert all(r.activations > 0 for r in ranks if r.trunk_layers)
        cfg = small(*over, f"train.freeze={mode}")
        plan = plan_layout(cfg, lay, 1e18, param_counts(cfg))
        assert all(r.activations == r.workspace == 0 for r in plan.ranks)


def test_frozen_trunk_measured():
    """Measured on the real model: with the trunk frozen, more trunk layers add nothing to the
    step's peak of live tensors (they keep no activations); training, each adds what the plan
    says a layer keeps."""
    from mtp_dist.training.memory import allocated_peak

    torch.set_num_threads(1)

    def peak(layers: int, mode: str) -> int:
        cfg = small(*HF, f"model.n_layers={layers}", f"train.freeze={mode}")
        torch.manual_seed(0)
        model = _frozen_model(cfg)
        ids = torch.randint(1, 512, (4, 34))
        step = lambda: model(ids[:, :32], ids[:, 1:]).loss.backward()  # noqa: E731
        step()
        return allocated_peak(step)

    layer = layer_activation_elements(small(*HF), Layout(), "none") * 4 * 32 * 4  # fp32
    assert peak(8, "none") - peak(4, "none") == pytest.approx(4 * layer, rel=0.03)
    for mode in ("trunk", "trunk_and_head1"):
        assert peak(8, mode) == peak(4, mode)


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


@pytest.mark.parametrize(
    "over",
    [[], HF, [*HF, "model.mtp_arch=chained", "model.n_future=3"]],
    ids=["plain", "hf", "chained"],
)
def test_flops_count_heads_and_unembedding_n_times(over):
    from mtp_dist.model import parameter_table

    cfg = small(*over)
    table = parameter_table(cfg.model)
    n, s = cfg.model.n_future, cfg.data.seq_len
    dq = cfg.model.n_attn_heads * cfg.model.attn_head_dim  # 64 plain, 32 hf
    matmul = sum(
        math.prod(p.shape) * (n if p.owner.kind == "unembed" else 1)
        for p in table.values()
        if p.role != "norm" and p.owner.kind != "embed" and not p.name.endswith("bias")
    )
    layers = cfg.model.trunk_layers + n
    assert flops_per_token(cfg, param_counts(cfg))["model"] == 6 * matmul + 12 * s * dq * layers


@pytest.mark.parametrize("over", [HF, TIED], ids=["hf", "tied"])
def test_flops_skip_the_backward_of_frozen_parts(over):
    """A frozen part runs its forward only: the trunk's backward (2x its forward) is saved under
    both modes; under 'trunk_and_head1' also head 1's layer and unembedding backward, and the
    unembedding's weight gradient of the heads that train (a tied one: under 'trunk' too). The
    unembedding's forward is still spent by every head, tied or not."""
    cfg = small(*over)
    c, m, s = param_counts(cfg), cfg.model, cfg.data.seq_len
    n, L, u = m.n_future, m.trunk_layers, m.vocab_size * m.d_model
    fwd = 2 * c.layer_matmul + 4 * s * m.n_attn_heads * m.attn_head_dim
    full = flops_per_token(cfg, c)["model"]
    assert full == 3 * fwd * (L + n) + 6 * u * n  # tied: still 6·V·d per head
    tied = m.tie_embeddings
    saved = {
        "trunk": 2 * fwd * L + (2 * u * n if tied else 0),
        "trunk_and_head1": 2 * fwd * L + 2 * fwd + 4 * u + 2 * u * (n - 1),
    }
    for mode, drop in saved.items():
        frozen = small(*over, f"train.freeze={mode}", "train.recompute=full")
        fl = flops_per_token(frozen, param_counts(frozen))
        assert fl["model"] == full - drop
        assert fl["hardware"] == fl["model"]  # a frozen trunk is not recomputed


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
    for name, over in {
        "naive": ["model.loss_impl=naive"],
        "sequential": [],
        "chunked": ["model.loss_chunk=64"],
    }.items():
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
    for key in (
        "params_total",
        "trainable_params",
        "freeze",
        "tokens_per_step",
        "flops_per_token",
        "step_seconds",
        "tokens_per_day",
        "days_to_budget",
        "layout",
        "candidates",
        "hardware",
    ):
        assert key in plan, key
    rank = plan["layout"]["ranks"][0]
    for key in ("weights", "gradients", "optimizer", "activations", "heads", "total"):
        assert rank[key] > 0, key
    assert plan["trainable_params"] == plan["params_total"]  # train.freeze=none
    assert rank["trainable_params"] == rank["params"]
    assert plan["layout"]["fits"] is True


# Llama-3.2-1B (16 layers, d 2048, 32 / 8 heads of 64, FFN 8192, 128256 tokens, tied) with
# 3 new heads, only they training: configs/heads-llama-1b.yaml's shape.
LLAMA_1B = ["model.vocab_size=128256", "model.d_model=2048", "model.n_layers=16",
            "model.parameter_matched=false", "model.n_future=4", "model.n_attn_heads=32",
            "model.n_kv_heads=8", "model.head_dim=64", "model.ffn_hidden=8192",
            "model.tie_embeddings=true", "train.freeze=trunk_and_head1", "train.precision=bf16",
            "parallel.zero_stage=2"]  # fmt: skip


def test_cli_sizes_a_frozen_imported_model():
    out = mtp("tiny-cpu", *LLAMA_1B, "--gpus", "8", "--gpu-memory-gb", "80", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    # a Llama layer: q, o 2048²; k, v 2048 x 512; SwiGLU 3 x 2048 x 8192; 2 norms
    layer = 2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert layer == 60_821_504
    assert plan["params_total"] == 1_235_814_400 + 3 * layer  # Llama-3.2-1B's count + 3 heads
    assert plan["trainable_params"] == 3 * layer
    assert plan["freeze"] == "trunk_and_head1"
    rank = plan["layout"]["ranks"][0]
    assert rank["trainable_params"] == 3 * layer
    assert rank["weights"] == 2 * plan["params_total"]  # bf16, every parameter
    assert rank["gradients"] == 6 * 3 * layer // 8  # ZeRO 2 over 8: the heads' only
    assert rank["activations"] == 0
    text = mtp("tiny-cpu", *LLAMA_1B, "--gpus", "8", "--gpu-memory-gb", "80")
    assert "1.418 B parameters (0.182 B trainable, train.freeze=trunk_and_head1)" in text.stdout


def test_cli_reports_a_layout_that_does_not_fit():
    out = mtp("code-7b-n4", "--gpus", "8", "--gpu-memory-gb", "1", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["layout"]["fits"] is False
    assert plan["layout"]["peak_bytes"] > 1e9
    text = mtp("code-7b-n4", "--gpus", "8", "--gpu-memory-gb", "1")
    assert "fits: NO" in text.stdout


def test_cli_gpus_the_recipe_layout_does_not_divide():
    # code-7b-n4 is tensor 8: on 3 GPUs the question is which layouts 3 GPUs can run
    args = ["code-7b-n4", "--gpus", "3", "--gpu-memory-gb", "80"]
    out = mtp(*args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    misfit = "the recipe's layout (model-parallel 8 x pipeline 1) does not divide 3 GPUs"
    assert sum(misfit in line for line in lines) == 1, out.stdout
    listed = [line.split()[0] for line in lines if line.startswith("  tp")]
    assert listed and all("-dp3-" in name for name in listed), out.stdout
    assert "fits: " not in out.stdout  # no per-rank table of a layout that cannot run
    plan = json.loads(mtp(*args, "--json").stdout)
    assert plan["layout"] is None and plan["layout_misfit"] == misfit
    assert plan["tokens_per_step"] is None and plan["step_seconds"] is None
    assert plan["tokens_per_day"] > 0
    worlds = {c["tensor"] * c["pipeline"] * c["data"] * c["head"] for c in plan["candidates"]}
    assert worlds == {3}
    fitting = [c for c in plan["candidates"] if c["fits"]]
    assert fitting and all(c["peak_bytes"] <= 80e9 for c in fitting)
    # the same recipe on 8 GPUs: tokens per day are the GPUs', not the layout's
    eight = json.loads(mtp("code-7b-n4", "--gpus", "8", "--gpu-memory-gb", "80", "--json").stdout)
    assert math.isclose(eight["tokens_per_day"] / plan["tokens_per_day"], 8 / 3)


def test_cli_lists_the_nearest_layouts_when_none_fits():
    out = mtp("code-7b-n4", "--gpus", "3", "--gpu-memory-gb", "5", "--top", "2")
    assert out.returncode == 0, out.stderr
    assert "none of 12 valid layouts fits 5 GB; smallest peaks:" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.startswith("  tp")]) == 2


def test_no_layout_for_the_gpus_is_one_reason(monkeypatch):
    # Unreachable with today's candidates (tensor 1, pipeline 1 takes any count): the reason a
    # future restriction would give.
    from mtp_dist import plan as planner
    from mtp_dist.config import ConfigError

    monkeypatch.setattr(planner, "candidate_layouts", lambda cfg, gpus: [])
    cfg = load_config("code-7b-n4", ["run_dir=x"])
    hw = planner.Hardware(gpus=3, memory_gb=80, tflops=989, mfu=0.4)
    with pytest.raises(ConfigError, match=r"does not divide 3 GPUs, and no other layout"):
        planner.make_plan(cfg, hw, 1e9)


@pytest.mark.parametrize(
    "args,words",
    [
        (["tiny-cpu", "--gpus", "0", "--gpu-memory-gb", "8"], "must be > 0"),
        (["tiny-cpu", "parallel.tensor=3", "--gpus", "3", "--gpu-memory-gb", "8"], "tensor 3"),
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


# ------------------------------------------------------------------ the chained family

CHAIN = ["model.mtp_arch=chained", "model.n_future=3"]


@pytest.mark.parametrize("over", [[], HF, TIED], ids=["plain", "hf", "tied"])
def test_chain_param_counts_are_the_models(over):
    """Depth 0 is a head layer; each module adds 3 norms and eh_proj (d x 2d), replicated
    under tensor parallelism; a pipeline's last stage holds a copy of the embedding."""
    from mtp_dist.model import MTPModel
    from mtp_dist.plan_params import chain_module_extra

    cfg = small(*over, *CHAIN)
    model = MTPModel(cfg.model)
    want = sum(p.numel() for p in model.parameters())
    counts = param_counts(cfg)
    assert counts.total == want
    assert counts.module == counts.head_layer + chain_module_extra(cfg)
    assert counts.module_matmul == counts.layer_matmul + 2 * cfg.model.d_model**2
    assert rank_params(cfg, Layout(), 0) == want
    whole = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "eh_proj" in n)
    assert rank_params(cfg, Layout(tensor=2), 0) == (want - whole) // 2 + whole
    for mode in FREEZE_MODES:
        frozen = small(*over, *CHAIN, f"train.freeze={mode}")
        trains = sum(p.numel() for p in _frozen_model(frozen).parameters() if p.requires_grad)
        assert param_counts(frozen).trainable == trains
        assert rank_param_counts(frozen, Layout(), 0) == (want, trains)
    if not cfg.model.tie_embeddings:
        copy = cfg.model.vocab_size * cfg.model.d_model
        stages = [rank_params(cfg, Layout(pipeline=3), s) for s in range(3)]
        assert sum(stages) == want + copy
    assert "does not apply" in plan_layout(cfg, Layout(head=3), 1e18, counts).error


@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_chain_flops_add_the_eh_projections(mode):
    """A chain's FLOPs are the parallel heads' of the same n plus each module's eh_proj
    (6 per weight of its d x 2d: modules train in every freeze mode)."""
    par = small(*HF, "model.n_future=3", f"train.freeze={mode}")
    cha = small(*HF, *CHAIN, f"train.freeze={mode}")
    extra = 2 * 6 * 2 * cha.model.d_model**2  # 2 modules
    got = flops_per_token(cha, param_counts(cha))["model"]
    assert got == flops_per_token(par, param_counts(par))["model"] + extra


@pytest.mark.parametrize(
    "n,impl,chunk,mode",
    [
        (4, "sequential", 0, "none"),
        (2, "sequential", 0, "none"),
        (4, "naive", 0, "none"),
        (4, "sequential", 32, "none"),
        (4, "sequential", 0, "trunk"),
        (4, "sequential", 0, "trunk_and_head1"),
    ],
)
def test_chain_step_peak_measured(n, impl, chunk, mode):
    """The plan's step memory of a chain (modules' own activations, one depth's logits for the
    sequential loss, every depth's for the naive one) against the measured peak of live
    tensors of a step on the real model (fp32, one process: the gradients exist before)."""
    from mtp_dist.training.memory import allocated_peak

    torch.set_num_threads(1)
    shape = ["data.seq_len=128", "model.max_seq_len=128", "train.micro_batch_size=4"]
    run = [f"model.loss_impl={impl}", f"model.loss_chunk={chunk}", f"train.freeze={mode}"]
    cfg = small(*CHAIN, f"model.n_future={n}", f"model.n_layers={n + 2}", *shape, *run,
                "train.precision=fp32")  # fmt: skip
    torch.manual_seed(0)
    model = _frozen_model(cfg)
    ids = torch.randint(1, 512, (4, 128 + n))
    step = lambda: model(ids[:, :128], ids[:, 1:]).loss.backward()  # noqa: E731
    step()
    planned = plan_layout(cfg, Layout(), 1e18, param_counts(cfg)).ranks[0].step
    assert planned == pytest.approx(allocated_peak(step), rel=0.04)


def test_cli_plans_a_chain():
    args = ["tiny-cpu", *CHAIN, "--gpus", "2", "--gpu-memory-gb", "8"]
    out = mtp(*args)
    assert out.returncode == 0, out.stderr
    assert "chained, n_future 3" in out.stdout
    plan = json.loads(mtp(*args, "--json").stdout)
    assert plan["mtp_arch"] == "chained"
    assert all(c["head"] == 1 for c in plan["candidates"])
