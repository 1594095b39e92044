"""What imported models need, in training and in decoding (float64, exact): tied input/output
embeddings, q/k/v biases, an explicit head_dim, llama3 rope scaling.

- training: the sequential head loss gives the naive all-heads-in-one-graph loss's gradients
  (with and without the chunked cross-entropy), the tied matrix receiving both uses' gradients;
- decoding: cached greedy (fused and module paths) = the uncached model's argmax, and
  self-speculative = plain greedy, batched and alone;
- llama3 rope: our rotary frequencies are transformers' `_compute_llama3_parameters` ones.
"""

from __future__ import annotations

import pytest
import torch

from mtp_dist.config import ModelConfig, RopeScalingConfig
from mtp_dist.inference import Decoder
from mtp_dist.model import MTPModel, parameter_table

VOCAB = 96
LLAMA3 = RopeScalingConfig(
    type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
OPTIONS = {
    "tied": {"tie_embeddings": True},
    "bias": {"attn_bias": True},
    "head_dim": {"head_dim": 12, "n_kv_heads": 2},
    "llama3": {"rope_scaling": LLAMA3, "rope_theta": 500000.0},
    "all": {
        "tie_embeddings": True,
        "attn_bias": True,
        "head_dim": 12,
        "n_kv_heads": 2,
        "rope_scaling": LLAMA3,
    },
}


def model_with(options: dict, n_future: int = 3, seed: int = 0, **extra) -> MTPModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2 + n_future,
        parameter_matched=True,
        n_attn_heads=4,
        n_future=n_future,
        max_seq_len=64,
        init_std=0.2,
        **options,
        **extra,
    )
    model = MTPModel(cfg).double()
    with torch.no_grad():  # non-zero biases, so that a bias dropped anywhere shows
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.3)
    return model


def grads(model: MTPModel, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(batch[:, :-3], batch[:, 1:])
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_sequential_gradients_equal_the_naive_loss(option, chunk):
    batch = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(1))
    sequential = model_with(OPTIONS[option], loss_chunk=chunk)
    naive = model_with(OPTIONS[option], loss_chunk=chunk, loss_impl="naive")
    naive.load_state_dict(sequential.state_dict())
    got, want = grads(sequential, batch), grads(naive, batch)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-12), name
    names = set(parameter_table(sequential.cfg))
    assert names == set(sequential.state_dict())  # one tensor per table entry, tied or not
    if sequential.cfg.tie_embeddings:
        assert "heads.unembed__proj__weight" not in names


def test_tied_matrix_gets_both_gradients():
    """The tied model's embedding gradient = the untied model's embedding + unembedding ones,
    with the same matrix in both places."""
    batch = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(2))
    tied = model_with({"tie_embeddings": True})
    untied = model_with({})
    state = {k: v for k, v in tied.state_dict().items()}
    state["heads.unembed__proj__weight"] = state["embed.weight"]
    untied.load_state_dict(state)
    g_tied, g_untied = grads(tied, batch), grads(untied, batch)
    both = g_untied["embed.weight"] + g_untied["heads.unembed__proj__weight"]
    assert torch.allclose(g_tied["embed.weight"], both, rtol=1e-10, atol=1e-12)


def reference_greedy(model: MTPModel, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model.next_token_logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_decoding_is_the_model(option):
    model = model_with(OPTIONS[option], n_future=4).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 5, 12)]
    want = [reference_greedy(model, p, 20) for p in prompts]
    for fused in (True, False):
        decoder = Decoder(model, fused=fused)
        assert decoder.run(prompts, max_new_tokens=20).tokens == want, fused
        for n_draft in (1, 3):
            spec = decoder.run(prompts, max_new_tokens=20, speculative=True, n_draft=n_draft)
            assert spec.tokens == want, (fused, n_draft)
        alone = [decoder.run([p], max_new_tokens=20, speculative=True).tokens[0] for p in prompts]
        assert alone == want


def test_llama3_rotary_frequencies_are_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}  # fmt: skip
    config = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, head_dim=12, rope_parameters=rope
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    model = model_with(OPTIONS["llama3"], head_dim=12)
    angles = torch.arange(64, dtype=torch.float64)[:, None] * inv_freq.double()[None]
    assert torch.allclose(model.rope_cos.double(), angles.cos(), atol=1e-6)
    assert torch.allclose(model.rope_sin.double(), angles.sin(), atol=1e-6)
    plain = model_with({"rope_theta": 500000.0}, head_dim=12)
    assert not torch.allclose(model.rope_cos, plain.rope_cos)  # the scaling did something
