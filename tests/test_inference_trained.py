"""Self-speculative decoding on trained models (byte and sentencepiece; n = 2, 4, 8).

Trained heads draft well enough that blocks are partly accepted and sequences of one batch
accept different numbers of tokens per step — the paths random models never reach. Checked:
speculative == plain greedy, batched == alone, in float64 (exact by construction) and in float32
(what `mtp generate` runs; it holds on these models, see docs/speculative_decoding.md).
"""

from __future__ import annotations

import pytest
import torch
from toy_models import (
    first_heads,
    letter_runs,
    stdlib_texts,
    template_code,
    train_toy_model,
)

from mtp_dist.inference import Decoder, GenerationConfig, Generator
from mtp_dist.tokenizers import ByteTokenizer, train_sentencepiece

# Which synthetic corpus each tokenizer's model learns within a few seconds of training.
CORPUS = {"bytes": letter_runs, "sentencepiece": template_code}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{kind: (tokenizer, n=8 model)}: one training per tokenizer; n=2, 4 are its first heads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sp_text = template_code(40, seed=0) + stdlib_texts("json")
    sp = train_sentencepiece(sp_text, tmp_path_factory.mktemp("sp"), vocab_size=400)
    models = {}
    for kind, tok in (("bytes", ByteTokenizer()), ("sentencepiece", sp)):
        texts = CORPUS[kind](40, seed=0)
        model = train_toy_model(tok, texts, n_future=8, steps=80, batch_size=8, seq_len=48, lr=1e-2)
        models[kind] = (tok, model)
    yield models
    torch.set_num_threads(before)


def held_out_prompts(kind: str, tok, count: int = 6) -> list[list[int]]:
    """Prompts of different lengths from texts the models never saw (another seed)."""
    texts = CORPUS[kind](count, seed=1)
    return [tok.encode(t[7 * i : 7 * i + 30 + 9 * i]) for i, t in enumerate(texts)]


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_trained_speculative_equals_greedy(trained, kind, n):
    tok, model8 = trained[kind]
    model = first_heads(model8, n)
    prompts = held_out_prompts(kind, tok)
    for dtype in (torch.float64, torch.float32):
        dec = Decoder(model.to(dtype), vocab_limit=tok.vocab_size)
        plain = dec.run(prompts, max_new_tokens=32)
        spec = dec.run(prompts, max_new_tokens=32, speculative=True)
        assert spec.tokens == plain.tokens, dtype
        if dtype == torch.float64:
            for p, expected in zip(prompts[:2], plain.tokens):
                assert dec.run([p], max_new_tokens=32, speculative=True).tokens == [expected]
            stats = spec.stats
            assert 0 < stats.acceptance_rate[1] < 1, stats.as_dict()  # drafts: some accepted
            assert stats.tokens_per_forward > 1.05, stats.as_dict()
            assert stats.mixed_steps > 0  # rows of one batch advanced by different amounts


def test_generator_text_identical_with_stop_strings(trained):
    tok, model8 = trained["sentencepiece"]
    gen = Generator(first_heads(model8, 4), tok)
    prompts = ["def add_1(x):\n", "class Point3:\n    def", "for i in range(7"]
    texts = {}
    for speculative in (False, True):
        cfg = GenerationConfig(max_tokens=48, stop=("\n\n", "self.y"), speculative=speculative)
        done, stats = gen.generate(prompts, cfg)
        texts[speculative] = [(c.text, c.finish_reason) for c in done]
        assert all("\n\n" not in c.text and "self.y" not in c.text for c in done)
    assert texts[False] == texts[True]
