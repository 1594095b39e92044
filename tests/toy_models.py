"""Test fixtures: small trained MTP models in seconds, for decoding tests and the CLI/eval smoke
tests.

A random model's extra heads never agree with head 1, so speculative decoding would only ever
take its rejection path; a few hundred AdamW steps on real code give heads whose drafts are
accepted often but not always — the mix the exactness tests need. `save_checkpoint` writes
the checkpoint layout of mtp_dist.checkpoint (config.yaml, model.pt, tokenizer/, complete.json),
so `load_for_inference` and the CLIs read it like a trained run.
"""

from __future__ import annotations

import random
import string
import sysconfig
from pathlib import Path

import torch

from mtp_dist import checkpoint as ckpt
from mtp_dist.config import DataConfig, ModelConfig, RunConfig
from mtp_dist.model import MTPModel, parameter_table

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(package: str = "json", limit: int = 40) -> list[str]:
    """Source files of one standard-library package: real code that needs no download."""
    paths = sorted((STDLIB / package).glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8") for p in paths]


TEMPLATES = (
    "def add_{a}(x):\n    return x + {b}\n\n",
    "def scale_{a}(values):\n    return [v * {b} for v in values]\n\n",
    "class Point{a}:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n",
    "for i in range({b}):\n    print(i, {a})\n\n",
)


def template_code(count: int, seed: int) -> list[str]:
    """Files of templated Python with random numbers: learnable in a few dozen steps, with
    positions heads can draft (the template) and positions they cannot (the numbers)."""
    rng = random.Random(seed)
    return [
        "".join(
            rng.choice(TEMPLATES).format(a=rng.randrange(100), b=rng.randrange(1000))
            for _ in range(20)
        )
        for _ in range(count)
    ]


def letter_runs(count: int, seed: int) -> list[str]:
    """Lines of consecutive letters ("klmnop") of random start and length: a byte model learns
    them quickly; drafts are right inside a run and wrong across line breaks."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    texts = []
    for _ in range(count):
        lines = []
        for _ in range(30):
            start, length = rng.randrange(26), rng.randrange(3, 12)
            lines.append("".join(letters[(start + j) % 26] for j in range(length)))
        texts.append("\n".join(lines) + "\n")
    return texts


def train_toy_model(
    tokenizer,
    texts: list[str],
    *,
    n_future: int,
    d_model: int = 64,
    trunk_layers: int = 2,
    seq_len: int = 64,
    max_seq_len: int = 256,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    **options,
) -> MTPModel:
    """An MTPModel (float32, eval mode) trained on random windows of the tokenized texts.
    `options`: further ModelConfig fields (e.g. mtp_arch="chained", n_attn_heads)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    data = torch.tensor(ids)
    shape = dict(
        vocab_size=ckpt.padded_vocab(tokenizer.vocab_size),
        d_model=d_model,
        n_layers=trunk_layers + n_future,
        n_attn_heads=4,
        n_future=n_future,
        max_seq_len=max_seq_len,
    )
    cfg = ModelConfig(**{**shape, **options})
    model = MTPModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    window = seq_len + n_future
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + window] for s in starts])  # (B, seq_len + n)
        loss = model(batch[:, :seq_len], batch[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def save_checkpoint(model: MTPModel, tokenizer, run_dir: str | Path, step: int = 1) -> Path:
    """Write `model` as a complete checkpoint of run_dir; returns the checkpoint directory."""
    kind = "bytes" if tokenizer.kind == "bytes" else "sentencepiece"
    data = DataConfig(tokenizer=kind, seq_len=min(DataConfig().seq_len, model.cfg.max_seq_len))
    cfg = RunConfig(run_dir=str(run_dir), model=model.cfg, data=data)
    tmp = ckpt.staging_dir(run_dir, step)
    torch.save(model.state_dict(), tmp / "model.pt")
    ckpt.write_common(tmp, cfg, tokenizer, {"step": step})
    return ckpt.publish(tmp, step, keep_last=1, meta={"source": "tests/toy_models.py"})


def first_heads(model: MTPModel, n: int) -> MTPModel:
    """The same trunk with only heads 1..n: an n-head model out of one trained with more heads
    (its heads were trained jointly, so their drafts are as good as in the bigger model)."""
    cfg = ModelConfig(
        **{**model.cfg.__dict__, "n_future": n, "n_layers": model.cfg.trunk_layers + n}
    )
    small = MTPModel(cfg)
    table = parameter_table(model.cfg)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if table[k].owner.kind != "head" or table[k].owner.index < n
    }
    small.load_state_dict(state)
    return small.to(next(model.parameters()).dtype).eval()
