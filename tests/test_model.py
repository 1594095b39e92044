"""The MTP model and its two loss implementations (pure unit tier, float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mtp_dist.config import ModelConfig
from mtp_dist.model import IGNORE_INDEX, MTPModel, count_parameters, shift_labels, split_window

V = 61


def tiny(n_future: int, loss_impl: str = "naive", **kw) -> MTPModel:
    torch.manual_seed(1234)
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=n_future + 2,
        n_attn_heads=4,
        n_future=n_future,
        max_seq_len=64,
        loss_impl=loss_impl,
        **kw,
    )
    return MTPModel(cfg).double()


def batch(T: int = 12, extra: int = 4, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, V, (B, T + extra), generator=g)
    return split_window(window, T)


def grads_of(model, inputs, labels, scale=1.0):
    model.zero_grad(set_to_none=True)
    out = model(inputs, labels)
    (out.loss * scale).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_future", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_sequential_gradients_equal_naive(n_future, masked):
    naive = tiny(n_future, "naive")
    seq = copy.deepcopy(naive)
    seq.heads.loss_impl = "sequential"
    # Labels shorter than T + n - 1 mask the tail of the later heads; -100 masks across padding.
    inputs, labels = batch(T=12, extra=n_future if not masked else 1)
    if masked:
        labels = labels.clone()
        labels[0, 3:6] = IGNORE_INDEX
        labels[2, -1] = IGNORE_INDEX
    out_a, grads_a = grads_of(naive, inputs, labels, scale=0.37)
    out_b, grads_b = grads_of(seq, inputs, labels, scale=0.37)
    assert torch.allclose(out_a.loss, out_b.loss, rtol=1e-13, atol=0)
    assert torch.equal(out_a.head_counts, out_b.head_counts)
    assert torch.allclose(out_a.head_losses, out_b.head_losses, rtol=1e-13, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(naive.parameters()))
    for name, g in grads_a.items():
        rel = (g - grads_b[name]).abs().max() / g.abs().max().clamp(min=1e-300)
        assert rel < 1e-10, f"{name}: relative error {rel:.3e}"
        assert g.abs().max() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("loss_impl", ["naive", "sequential"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])  # one position, 2 positions + a short tail, all
def test_chunked_cross_entropy_equals_naive(loss_impl, chunk):
    """model.loss_chunk: the same losses, metrics and float64 gradients as the unchunked naive
    loss, with masking (short labels, -100 holes), backward of a scaled loss."""
    naive = tiny(4, "naive")
    chunked = copy.deepcopy(naive)
    chunked.heads.loss_impl, chunked.heads.loss_chunk = loss_impl, chunk
    inputs, labels = batch(T=12, extra=1)
    labels = labels.clone()
    labels[0, 3:6] = IGNORE_INDEX
    out_a, grads_a = grads_of(naive, inputs, labels, scale=0.37)
    out_b, grads_b = grads_of(chunked, inputs, labels, scale=0.37)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(out_b.head_losses, out_a.head_losses, rtol=1e-13, atol=0)
    assert torch.equal(out_a.head_counts, out_b.head_counts)
    assert torch.equal(out_a.head_correct, out_b.head_correct)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        rel = (g - grads_b[name]).abs().max() / g.abs().max().clamp(min=1e-300)
        assert rel < 1e-10, f"{name}: relative error {rel:.3e}"
        assert g.abs().max() > 0, f"{name} got no gradient"
    with torch.no_grad():  # evaluation: chunked too, no gradients computed
        evaluated = chunked(inputs, labels)
    torch.testing.assert_close(evaluated.head_losses, out_a.head_losses, rtol=1e-13, atol=0)


class _LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor with a vocabulary-sized last dimension that an
    op makes (logits, log-probabilities and their gradients), forward and backward; the
    unembedding weight's transpose (d, V) is a parameter, not logits."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.shape[-1:] == (V,) and t.shape != (32, V):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss_impl", ["naive", "sequential"])
def test_chunked_cross_entropy_never_makes_whole_logits(loss_impl):
    """With loss_chunk = 6 tokens (2 positions of a 3-row batch) no op makes a tensor of more than
    one chunk's logits, training or evaluating; without it, whole (B, T, V) logits appear."""
    B, T = 3, 12
    inputs, labels = batch(T=T, extra=4, B=B)
    for chunk, most in ((0, B * T * V), (6, B * 2 * V)):
        model = tiny(4, loss_impl, loss_chunk=chunk)
        for grad in (True, False):
            with torch.set_grad_enabled(grad), _LargestLogits() as probe:
                out = model(inputs, labels)
                if grad:
                    out.loss.backward()
            assert probe.largest == most, (chunk, grad, probe.largest)


def test_loss_is_plain_sum_of_head_means():
    model = tiny(4)
    inputs, labels = batch()
    with torch.no_grad():
        out = model(inputs, labels)
        h, cos, sin = model.trunk_forward(inputs)
        T = inputs.shape[1]
        expected = []
        for i in range(4):
            logits = model.heads.logits(h, cos, sin, i)  # (B, T, V)
            target = labels[:, i : i + T]  # head i+1 at position t targets token t + i + 1
            expected.append(F.cross_entropy(logits.reshape(-1, V), target.reshape(-1)))
    torch.testing.assert_close(out.head_losses, torch.stack(expected), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, torch.stack(expected).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_impl", ["naive", "sequential"])
def test_head_i_targets_token_t_plus_i(loss_impl, monkeypatch):
    """An oracle that predicts token t+i from head i reaches ~zero loss; shifted by one it fails."""
    n, T = 4, 10
    model = tiny(n, loss_impl)
    window = torch.arange(T + n).repeat(2, 1) % V  # distinct tokens: alignments are unambiguous
    inputs, labels = split_window(window, T)

    def run(offset: int) -> torch.Tensor:
        def head_hidden(i, h, cos, sin, kv_cache=None, params=None):
            return h[..., :1] * 0 + i  # carries the head index to the oracle projection

        def project(x, params=None):
            i = int(x[0, 0, 0])
            # Head i (0-based) should name the token i + 1 positions ahead of input position t.
            future = window[:, 1 + i + offset : 1 + i + offset + T]
            if future.shape[1] < T:
                future = torch.cat([future, future.new_zeros(2, T - future.shape[1])], 1)
            return F.one_hot(future, V).double() * 50.0

        monkeypatch.setattr(model.heads, "head_hidden", head_hidden)
        monkeypatch.setattr(model.heads, "project", project)
        with torch.no_grad():
            return model(inputs, labels).head_losses

    assert run(offset=0).max() < 1e-12
    assert run(offset=1).min() > 10.0  # an off-by-one alignment cannot reach zero loss


def test_shift_labels_masks_past_the_end():
    labels = torch.arange(6).view(1, 6)
    assert shift_labels(labels, 0, 4).tolist() == [[0, 1, 2, 3]]
    assert shift_labels(labels, 3, 4).tolist() == [[3, 4, 5, IGNORE_INDEX]]
    assert shift_labels(labels, 7, 2).tolist() == [[IGNORE_INDEX, IGNORE_INDEX]]


def test_parameter_matched_keeps_total_layers():
    base = MTPModel(ModelConfig(vocab_size=V, d_model=32, n_layers=6, n_attn_heads=4, n_future=1))
    matched = MTPModel(ModelConfig(vocab_size=V, d_model=32, n_layers=6, n_attn_heads=4))
    unmatched = MTPModel(
        ModelConfig(vocab_size=V, d_model=32, n_layers=6, n_attn_heads=4, parameter_matched=False)
    )
    assert len(base.trunk) == 5 and len(matched.trunk) == 2 and len(unmatched.trunk) == 5
    assert count_parameters(base) == count_parameters(matched)
    assert count_parameters(unmatched) > count_parameters(matched)


def test_unembedding_is_shared_and_untied():
    model = tiny(4)
    names = [n for n, _ in model.heads.named_parameters()]
    assert sum(n.startswith("unembed__proj") for n in names) == 1  # one shared projection
    assert sum(n.startswith("head") and n.endswith("wq__weight") for n in names) == 4
    unembed = dict(model.heads.named_parameters())["unembed__proj__weight"]
    assert unembed.data_ptr() != model.embed.weight.data_ptr()


def test_sequential_frees_logits_between_heads():
    """Saved tensors of the sequential loss: parameter-sized gradients and one (B, T, d) tensor,
    never (B, T, V) logits -- the O(V + d) memory claim, checked structurally."""
    model = tiny(4, "sequential")
    inputs, labels = batch(T=12, extra=4, B=3)
    out = model(inputs, labels)
    saved = out.loss.grad_fn.saved_tensors
    params = {p.shape for p in model.heads.parameters()}
    for t in saved:
        assert t.shape in params or t.shape == (3, 12, 32), t.shape


def test_next_token_logits_is_causal():
    model = tiny(2)
    inputs, _ = batch(T=10)
    full = model.next_token_logits(inputs)
    prefix = model.next_token_logits(inputs[:, :6])
    torch.testing.assert_close(full[:, :6], prefix, rtol=1e-10, atol=1e-12)


def test_pad_labels_are_masked():
    model = tiny(2, pad_id=7)
    inputs, labels = batch(T=12, extra=2)
    labels = labels.clone()
    labels[:, -4:] = 7  # the padded tail of a split's last window
    with torch.no_grad():
        padded = model(inputs, labels)
        ignored = model(inputs, labels.masked_fill(labels == 7, IGNORE_INDEX))
    assert torch.equal(padded.head_counts, ignored.head_counts)
    torch.testing.assert_close(padded.head_losses, ignored.head_losses, rtol=0, atol=0)


@pytest.mark.parametrize(
    "n_future, parameter_matched", [(1, False), (2, False), (4, False), (4, True)]
)
def test_streamed_initial_parameters_are_the_constructed_model(n_future, parameter_matched):
    """What a parallel rank slices its initial weights from, one parameter at a time, is
    bit for bit what `torch.manual_seed(seed); MTPModel(cfg)` holds."""
    from mtp_dist.model.init import initial_parameters

    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=6, n_attn_heads=2, ffn_hidden=24,
                      n_future=n_future, parameter_matched=parameter_matched)  # fmt: skip
    torch.manual_seed(7)
    built = dict(MTPModel(cfg).named_parameters())
    streamed = list(initial_parameters(cfg, seed=7))
    assert [name for name, _ in streamed] == list(built)
    for name, value in streamed:
        assert torch.equal(value, built[name].detach()), name
    other = dict(initial_parameters(cfg, seed=8))
    assert not torch.equal(other["embed.weight"], built["embed.weight"])


@pytest.mark.parametrize("n_future, parameter_matched", [(1, False), (4, True)])
def test_parameter_table_is_the_model(n_future, parameter_matched):
    """The table lists every parameter of the built model, in its order, with its shape; owners
    and split dimensions follow the layers that made them."""
    from mtp_dist.model import Owner, parameter_table

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=6, n_attn_heads=2, ffn_hidden=24,
                      n_future=n_future, parameter_matched=parameter_matched)  # fmt: skip
    table = parameter_table(cfg)
    built = list(MTPModel(cfg).named_parameters())
    assert list(table) == [name for name, _ in built]
    for name, param in built:
        assert table[name].shape == tuple(param.shape), name
    expect = {
        "embed.weight": (Owner("embed"), "embedding", 0),
        "trunk.0.attn.wq.weight": (Owner("trunk", 0), "column", 0),
        "trunk.0.attn.wo.weight": (Owner("trunk", 0), "row", 1),
        "trunk.0.mlp.w_down.weight": (Owner("trunk", 0), "row", 1),
        "trunk.0.mlp_norm.weight": (Owner("trunk", 0), "norm", None),
        f"heads.head{n_future - 1}__mlp__w_up__weight": (Owner("head", n_future - 1), "column", 0),
        "heads.unembed__proj__weight": (Owner("unembed"), "unembedding", 0),
        "heads.unembed__norm__weight": (Owner("unembed"), "norm", None),
    }
    for name, (owner, role, dim) in expect.items():
        spec = table[name]
        assert (spec.owner, spec.role, spec.split_dim) == (owner, role, dim), name
    assert table["trunk.0.attn.wq.weight"].path == "attn.wq.weight"
    per_layer = len(table.owned_by("trunk")) // cfg.trunk_layers  # a head layer is a block too
    assert len(table.owned_by("head")) == n_future * per_layer
    with pytest.raises(ValueError, match="missing"):
        table.check_names(list(table)[1:], "a state dict")


def test_heads_held_and_reduction_are_constructor_seams():
    """A model holding only some heads (head parallelism) has only those heads' parameters and
    runs only them; the shared gradients go through the injected HeadReduction."""
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=6, n_attn_heads=4, n_future=4)
    calls = []

    class Recording:
        def reduce_hidden_grad(self, grad_h):
            calls.append("hidden")
            return grad_h

        def reduce_shared_grads(self, grads):
            calls.append(len(grads))

    model = MTPModel(cfg, head_ids=(1, 3), head_reduction=Recording())
    names = [n for n, _ in model.heads.named_parameters()]
    assert {n.split("__")[0] for n in names} == {"head1", "head3", "unembed"}
    inputs, labels = batch(T=12, extra=4)
    out = model(inputs, labels)
    assert out.head_ids == (1, 3) and out.head_losses.shape == (2,)
    out.loss.backward()
    assert calls == ["hidden", 2]  # the trunk gradient, and the unembedding's norm + projection


def test_grouped_query_attention_is_attention_with_shared_key_value_heads():
    """n_kv_heads = 2 of 4: the model equals the multi-head model whose key/value projections
    repeat each of its 2 heads for its 2 query heads (query head h reads k/v head h // 2), in
    float64; the k/v projections are half as wide."""
    import copy

    from mtp_dist.config import ModelConfig
    from mtp_dist.model import MTPModel

    base = dict(vocab_size=64, d_model=32, n_layers=3, n_attn_heads=4, n_future=2, max_seq_len=16)
    torch.manual_seed(0)
    gqa = MTPModel(ModelConfig(**base, n_kv_heads=2)).double()
    mha = MTPModel(ModelConfig(**base)).double()
    state = copy.deepcopy(gqa.state_dict())
    hd = 32 // 4
    for name, tensor in list(state.items()):
        if name.replace("__", ".").endswith(("attn.wk.weight", "attn.wv.weight")):  # heads: flat
            assert tensor.shape == (2 * hd, 32)
            state[name] = tensor.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12 + 2))
    torch.testing.assert_close(gqa(ids, labels).loss, mha(ids, labels).loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        gqa.next_token_logits(ids), mha.next_token_logits(ids), rtol=1e-12, atol=1e-12
    )
