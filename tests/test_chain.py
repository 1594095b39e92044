"""The chained family's loss (mtp_dist/model/chain.py; docs/sequential_heads.md, "The trick on
chains"), float64, against an independent plain-torch reference of the formula written here.

With n_future = n the main model is trunk -> depth 0 (a Block) -> final norm -> U, and module
k = 1..n-1 is h^k = norm_k(Block_k(W_k [enorm_k(E x_{t+k}) ; hnorm_k(h^{k-1})])), logits U h^k
predicting x_{t+k+1}; the token embedding fed to a module is zero at sequence position 0.
Loss = CE_0 + lambda * mean_k CE_k, each CE the mean over the depth's unmasked targets.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from mtp_dist.config import ModelConfig
from mtp_dist.model import IGNORE_INDEX, MTPModel, split_window
from mtp_dist.model.chain import zero_first_position
from mtp_dist.training.freeze import apply_freeze

V, D = 37, 16
SHAPES = {
    "plain": {},
    "tied": {"tie_embeddings": True},
    "gqa": {"n_kv_heads": 1},
    "hf": {"head_dim": 6, "n_kv_heads": 1, "attn_bias": True},  # head_dim != d / H
}


def chain(n: int, *, impl: str = "sequential", chunk: int = 0, vocab: int = V, **kw) -> MTPModel:
    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=vocab, d_model=D, n_layers=n + 1, n_attn_heads=2, n_future=n,
                      ffn_hidden=24, max_seq_len=32, mtp_arch=kw.pop("mtp_arch", "chained"),
                      loss_impl=impl, loss_chunk=chunk, **kw)  # fmt: skip
    model = MTPModel(cfg).double()
    if cfg.attn_bias:  # biases start at zero: give them values, so that a wrong use shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def batch(T: int = 8, extra: int = 3, B: int = 2, seed: int = 0, holes: bool = False):
    g = torch.Generator().manual_seed(seed)
    inputs, labels = split_window(torch.randint(0, V, (B, T + extra), generator=g), T)
    if holes:  # -100 in the middle (a module reading one embeds token 0) and a short tail
        labels = labels.clone()
        labels[0, 2:4] = IGNORE_INDEX
    return inputs, labels


# ------------------------------------------------------------------ the independent reference


def reference_loss(model: MTPModel, p: dict, inputs, labels, zero_first: bool = True):
    """The chain's loss from the parameters `p` (canonical names), by the formula above, in
    plain torch: explicit attention with its causal mask, loops over depths and positions.
    Only the rotary tables are the model's (float32 tables, tested in test_model_options)."""
    cfg = model.cfg
    B, T = inputs.shape
    L = labels.shape[1]
    H, Hkv, hd = cfg.n_attn_heads, cfg.kv_heads, cfg.attn_head_dim
    E = p["embed.weight"]
    U = E if cfg.tie_embeddings else p["heads.unembed__proj__weight"]
    cos, sin = model.rope_cos[:T].double(), model.rope_sin[:T].double()

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rotate(x):  # (B, heads, T, hd), half-split pairs
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def block(x, prefix: str, sep: str):
        def lin(y, name, bias=False):
            out = y @ p[prefix + name.replace(".", sep) + sep + "weight"].T
            return out + p[prefix + name.replace(".", sep) + sep + "bias"] if bias else out

        a = norm(x, p[f"{prefix}attn_norm{sep}weight"])
        q = lin(a, "attn.wq", cfg.attn_bias).view(B, T, H, hd).transpose(1, 2)
        k = lin(a, "attn.wk", cfg.attn_bias).view(B, T, Hkv, hd).transpose(1, 2)
        v = lin(a, "attn.wv", cfg.attn_bias).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + lin(y.transpose(1, 2).reshape(B, T, H * hd), "attn.wo")
        m = norm(x, p[f"{prefix}mlp_norm{sep}weight"])
        gate, up = lin(m, "mlp.w_gate"), lin(m, "mlp.w_up")
        return x + lin(gate * torch.sigmoid(gate) * up, "mlp.w_down")

    def mean_ce(h, k):  # depth k at position t targets labels[:, t + k] (token t + k + 1)
        logits = h @ U.T
        total, count = h.new_zeros(()), 0
        for b in range(B):
            for t in range(T):
                if t + k < L and labels[b, t + k] != IGNORE_INDEX:
                    row = logits[b, t]
                    total = total + torch.logsumexp(row, 0) - row[labels[b, t + k]]
                    count += 1
        return total / max(count, 1)

    x = E[inputs]
    for j in range(cfg.trunk_layers):
        x = block(x, f"trunk.{j}.", ".")
    h = norm(block(x, "heads.head0__", "__"), p["heads.unembed__norm__weight"])
    losses = [mean_ce(h, 0)]
    for k in range(1, cfg.n_future):
        m = f"heads.head{k}__"
        rows = []
        for b in range(B):  # E x_{t+k} = E labels[:, t + k - 1]; ignored or absent: token 0
            ids = [int(labels[b, t + k - 1]) if t + k - 1 < L else 0 for t in range(T)]
            rows.append(E[torch.tensor([max(i, 0) for i in ids])])
        e = torch.stack(rows)
        if zero_first:
            e = torch.cat((torch.zeros_like(e[:, :1]), e[:, 1:]), dim=1)
        cat = torch.cat((norm(e, p[m + "enorm__weight"]), norm(h, p[m + "hnorm__weight"])), -1)
        z = block(cat @ p[m + "eh_proj__weight"].T, m + "block__", "__")
        h = norm(z, p[m + "norm__weight"])
        losses.append(mean_ce(h, k))
    lam = cfg.chain_loss_weight
    extra = lam * sum(losses[1:]) / (len(losses) - 1) if len(losses) > 1 else 0.0
    return losses[0] + extra, torch.stack(losses).detach()


def reference_grads(model, inputs, labels, **kw):
    leaves = {n: q.detach().clone().requires_grad_(q.requires_grad)
              for n, q in model.named_parameters()}  # fmt: skip
    loss, per_depth = reference_loss(model, leaves, inputs, labels, **kw)
    loss.backward()
    return loss.detach(), per_depth, {n: q.grad for n, q in leaves.items()}


def model_grads(model, inputs, labels, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    out = model(inputs, labels)
    (out.loss * scale).backward()
    return out, {n: q.grad for n, q in model.named_parameters()}


def assert_grads_equal(got: dict, want: dict, rel: float = 1e-12) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        if g is None:
            assert got[name] is None, f"{name} got a gradient"
            continue
        assert got[name] is not None, f"{name} got no gradient"
        err = (got[name] - g).abs().max() / g.abs().max().clamp(min=1e-300)
        assert err <= rel, f"{name}: relative error {err:.3e}"


# ------------------------------------------------------------------ tests


IMPLS = [("sequential", 0), ("naive", 0), ("sequential", 3), ("naive", 5)]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_implementation_is_the_reference(shape, n):
    """sequential, naive, each chunked: loss, per-depth losses and every gradient equal the
    reference's to 1e-12, with masking (a -100 hole, labels short of T + n - 1)."""
    inputs, labels = batch(extra=max(1, n - 1), holes=True)
    base = chain(n, **SHAPES[shape])
    loss, per_depth, want = reference_grads(base, inputs, labels)
    for impl, chunk in IMPLS:
        model = copy.deepcopy(base)
        model.heads.loss_impl, model.heads.loss_chunk = impl, chunk
        out, got = model_grads(model, inputs, labels)
        torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.head_losses, per_depth, rtol=1e-12, atol=0)
        assert_grads_equal(got, want)
        nonzero = [name for name, g in got.items() if g.abs().max() == 0]
        assert not nonzero, f"{impl}/{chunk}: {nonzero} got a zero gradient"


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_loss_weight(lam):
    """model.mtp_loss_weight 0 and 1: the reference's CE_0 + lambda * mean_k CE_k, and a scaled
    backward (grad_output 0.37) scales every gradient; at 0 the modules get zero gradients."""
    inputs, labels = batch()
    base = chain(3, mtp_loss_weight=lam)
    loss, per_depth, want = reference_grads(base, inputs, labels)
    assert base.heads.head_weights == (1.0, lam / 2, lam / 2)
    torch.testing.assert_close(loss, per_depth[0] + lam * per_depth[1:].mean(), rtol=1e-14, atol=0)
    for impl, chunk in IMPLS:
        model = copy.deepcopy(base)
        model.heads.loss_impl, model.heads.loss_chunk = impl, chunk
        out, got = model_grads(model, inputs, labels, scale=0.37)
        torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-12, atol=0)
        assert_grads_equal(got, {n: 0.37 * g for n, g in want.items()})
        modules = [g for name, g in got.items() if name.startswith(("heads.head1", "heads.head2"))]
        assert all((g.abs().max() == 0) == (lam == 0) for g in modules)


@pytest.mark.parametrize("impl", ["sequential", "naive"])
def test_one_depth_is_the_next_token_model(impl):
    """n_future 1: a chain with no module is the parallel family's n = 1 model (same names,
    same weights): same loss, same gradients."""
    inputs, labels = batch()
    chained = chain(1, impl=impl)
    parallel = chain(1, impl=impl, mtp_arch="parallel")
    parallel.load_state_dict(chained.state_dict())
    out_c, grads_c = model_grads(chained, inputs, labels)
    out_p, grads_p = model_grads(parallel, inputs, labels)
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-14, atol=0)
    assert_grads_equal(grads_c, grads_p, rel=1e-13)


def test_position_zero_embedding_is_zeroed():
    """A module's token input at sequence position 0 is zero: the model agrees with the
    reference that zeroes it and not with one that does not; absolute positions decide
    (a window starting at position 5 keeps its first row, per-row positions work)."""
    inputs, labels = batch()
    model = chain(2)
    with torch.no_grad():
        got = model(inputs, labels).loss
        params = dict(model.named_parameters())
        zeroed, _ = reference_loss(model, params, inputs, labels)
        kept, _ = reference_loss(model, params, inputs, labels, zero_first=False)
    torch.testing.assert_close(got, zeroed, rtol=1e-12, atol=0)
    assert abs(float(got - kept)) > 1e-6
    e = torch.randn(2, 4, D, dtype=torch.float64)
    assert torch.equal(zero_first_position(e, torch.arange(5, 9)), e)
    rows = zero_first_position(e, torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]]))
    assert torch.equal(rows[0, 0], torch.zeros(D, dtype=torch.float64))
    assert torch.equal(rows[0, 1:], e[0, 1:]) and torch.equal(rows[1], e[1])


@pytest.mark.parametrize("mode", ["trunk", "trunk_and_head1"])
@pytest.mark.parametrize("impl,chunk", [("sequential", 0), ("naive", 0), ("sequential", 3)])
@pytest.mark.parametrize("tied", [False, True])
def test_frozen_modes(mode, impl, chunk, tied):
    """train.freeze: frozen parameters get no gradient; the trained ones get the unfrozen
    model's gradients (trunk_and_head1 freezes the whole main model: only the modules train)."""
    inputs, labels = batch()
    base = chain(3, impl=impl, chunk=chunk, tie_embeddings=tied)
    _, want = model_grads(copy.deepcopy(base), inputs, labels)
    model = copy.deepcopy(base)
    apply_freeze(model, model.cfg, mode)
    _, got = model_grads(model, inputs, labels)
    frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
    assert frozen and len(frozen) < len(got)
    if mode == "trunk_and_head1":
        assert all(n.startswith(("heads.head1", "heads.head2")) for n in set(got) - frozen)
    assert_grads_equal(got, {n: None if n in frozen else g for n, g in want.items()})


def _most_alive(work, nbytes: int) -> int:
    """Most allocations of at least `nbytes` alive at once during work() (torch's profiler
    memory events: each allocation and free with its address, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    alive, most = set(), 0
    for e in events:
        if e.get("name") != "[memory]" or abs(e["args"]["Bytes"]) < nbytes:
            continue
        addr = e["args"]["Addr"]
        if e["args"]["Bytes"] > 0:
            alive.add(addr)
        else:
            alive.discard(addr)
        most = max(most, len(alive))
    return most


def test_sequential_keeps_one_depths_logits():
    """Counted by the allocator's events over forward + backward: the sequential loss of a
    4-depth chain never has more (B, T, V) tensors alive than the 1-depth chain (the next-token
    model); the naive loss has the 3 modules' log-probabilities more; with loss_chunk none is
    ever whole. V = 211 > d: (B, T, V) is larger than any other tensor of the step."""
    torch.set_num_threads(1)
    B, T, vocab = 2, 24, 211
    g = torch.Generator().manual_seed(1)
    inputs, labels = split_window(torch.randint(0, vocab, (B, T + 3), generator=g), T)
    size = B * T * vocab * 8  # float64

    def most(n, impl, chunk=0):
        model = chain(n, impl=impl, chunk=chunk, vocab=vocab)
        step = lambda: model(inputs, labels).loss.backward()  # noqa: E731
        step()  # gradients exist from here on, as in training
        return _most_alive(step, size)

    one = most(1, "sequential")
    assert one >= 2  # the probe sees a depth's log-probabilities and their gradient
    assert most(4, "sequential") == one
    assert most(4, "naive") >= one + 3
    assert most(4, "sequential", chunk=8) == 0
