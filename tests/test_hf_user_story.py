"""The user story of "pretrained models come in", end to end through the command line: a
next-token run goes out with `mtp export hf`, comes back with `mtp import hf --n-future 4`, and
`mtp train heads-cpu --init-from` trains only its three new heads (train.freeze=trunk_and_head1).
The new heads learn (their validation losses fall and tokens per forward rise on held-out
prompts), and the next-token model is bit-identical before and after (the two exports give
transformers the same logits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from toy_models import save_checkpoint, stdlib_texts, train_toy_model

from mtp_dist.checkpoint import load_for_inference
from mtp_dist.cli import main
from mtp_dist.inference import Decoder
from mtp_dist.tokenizers import train_sentencepiece

transformers = pytest.importorskip("transformers")


def tokens_per_forward(run: Path, prompts: list[str]) -> tuple[float, list[int]]:
    model, tok = load_for_inference(run)
    decoder = Decoder(model, vocab_limit=tok.vocab_size)
    ids = [tok.encode(p) for p in prompts]
    plain = decoder.run(ids, max_new_tokens=32)
    spec = decoder.run(ids, max_new_tokens=32, speculative=True)
    assert spec.tokens == plain.tokens  # self-speculative output = plain greedy
    return spec.stats.tokens_per_forward, [t for seq in plain.tokens for t in seq]


@pytest.mark.slow
def test_export_import_train_new_heads(tmp_path, capsys):
    texts = stdlib_texts("json") + stdlib_texts("email", limit=20)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts[:-4]):
        (corpus / f"f{i}.py").write_text(text)
    held_out = [t[:200] for t in texts[-4:]]
    tok = train_sentencepiece(sorted(corpus.glob("*.py")), tmp_path / "tok", vocab_size=800)
    base = train_toy_model(tok, texts[:-4], n_future=1, d_model=64, seq_len=64, steps=120)
    native = save_checkpoint(base, tok, tmp_path / "native")

    assert main(["export", "hf", str(native), str(tmp_path / "hf")]) == 0
    run = tmp_path / "imported"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(run), "--n-future", "4"]) == 0
    before, greedy_before = tokens_per_forward(run, held_out)

    trained = tmp_path / "heads"
    code = main(
        ["train", "heads-cpu", "--init-from", str(run), f"run_dir={trained}",
         f"data.source={corpus}", "data.seq_len=64", "train.max_steps=60", "train.lr=3e-3",
         "train.eval_every=20", "train.ckpt_every=60", "tracking.enabled=false"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    after, greedy_after = tokens_per_forward(trained, held_out)
    print(f"tokens per forward: {before:.3f} imported, {after:.3f} after 60 steps")
    assert greedy_after == greedy_before
    assert after > before + 0.05

    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    first = torch.tensor([r["head_losses"] for r in rows[:5]]).mean(0)
    last = torch.tensor([r["head_losses"] for r in rows[-5:]]).mean(0)
    print(f"train head losses, steps 1-5 {first.tolist()}, steps 56-60 {last.tolist()}")
    assert (last[1:] < first[1:] - 0.1).all()  # the new heads learn

    # The next-token model is bit-identical: both exports give transformers the same logits.
    assert main(["export", "hf", str(trained), str(tmp_path / "hf_after")]) == 0
    ids = torch.tensor([tok.encode(texts[-1])[:64]])
    logits = []
    for out in (tmp_path / "hf", tmp_path / "hf_after"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(hf(ids).logits)
    assert torch.equal(logits[0], logits[1])
