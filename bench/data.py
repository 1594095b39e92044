"""Data pipeline throughput: builder MB/s, reader tokens/s vs the tiny-cpu trainer's appetite.

    python bench/data.py [--recipe configs/tiny-cpu.yaml --workers 2 --reader-batches 3000]

One run, on the demo corpus (this interpreter's stdlib, the tiny-cpu recipe's tokenizer and
window): (1) train the sentencepiece model and build the shards from scratch - builder MB/s;
(2) the reader with 2 DataLoader workers alone - delivered tokens/s; (3) the same tokens from a
memory-mapped flat token file (nanoGPT / Megatron indexed-dataset style: random windows by
offset) - tokens/s; (4) the tiny-cpu model's training step (forward, backward, AdamW) - consumed
tokens/s; (5) training fed live by the reader - the share of step time spent waiting for data.
Tokens count whole windows (seq_len + n_future) on every side. Prints lines, then one JSON object
(last line) with `ratio_reader_vs_trainer`. Target: >= 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import STDLIB_EXCLUDE, TokenWindowLoader, build_shards, list_files, stdlib_root
from mtp_dist.config import load_config
from mtp_dist.model import MTPModel, split_window
from mtp_dist.tokenizers import ByteTokenizer, train_sentencepiece


def reader_rate(loader: TokenWindowLoader, batches: int, warmup: int = 50) -> float:
    """Tokens/s the loader delivers after `warmup` batches (worker start-up excluded)."""
    count, start = 0, 0.0
    for i, batch in enumerate(loader):
        if i == warmup:
            start, count = time.perf_counter(), 0
        count += batch.numel()
        if i == warmup + batches:
            break
    return count / (time.perf_counter() - start)


def memmap_rate(path: Path, window: int, batch: int, batches: int) -> float:
    """nanoGPT's get_batch: random offsets into a flat uint16 token file, stacked to int64."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        offsets = rng.integers(0, len(data) - window, size=batch)
        x = torch.from_numpy(np.stack([data[o : o + window] for o in offsets]).astype(np.int64))
        count += x.numel()
    return count / (time.perf_counter() - start)


def train_rate(model: MTPModel, batches, seq_len: int, steps: int, warmup: int) -> tuple:
    """(tokens/s consumed, fraction of wall time spent waiting for the next batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, waits, it = [], [], iter(batches)
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        window = next(it)
        t1 = time.perf_counter()
        inputs, labels = split_window(window, seq_len)
        opt.zero_grad(set_to_none=True)
        model(inputs, labels).loss.backward()
        opt.step()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
    tokens = window.numel()
    return tokens / statistics.median(times), sum(waits) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/tiny-cpu.yaml")
    parser.add_argument("--workers", type=int, default=2, help="reader DataLoader workers")
    parser.add_argument("--build-workers", type=int, default=2)
    parser.add_argument("--reader-batches", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tokenizer", choices=["sentencepiece", "bytes"], default=None)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    cfg = load_config(args.recipe)
    seq_len, n_future, bs = cfg.data.seq_len, cfg.model.n_future, cfg.train.micro_batch_size
    kind = args.tokenizer or cfg.data.tokenizer
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mtp_bench_data_"))
    files = list_files([stdlib_root()], ["**/*.py"], STDLIB_EXCLUDE)

    t0 = time.perf_counter()
    if kind == "bytes":
        tok = ByteTokenizer()
    else:
        tok = train_sentencepiece(files, work / "tokenizer", vocab_size=cfg.data.sp_vocab_size)
    tok_s = time.perf_counter() - t0
    m = build_shards(
        [stdlib_root()],
        work / "shards",
        tok,
        seq_len,
        n_future,
        exclude=STDLIB_EXCLUDE,
        workers=args.build_workers,
        progress=False,
    )
    build = m.build_stats
    print(f"tokenizer: {kind} vocab {tok.vocab_size}, trained in {tok_s:.1f}s")
    print(
        f"builder: {m.totals['bytes'] / 1e6:.1f} MB, {m.totals['tokens']} tokens, "
        f"{build['seconds']:.1f}s = {build['mb_per_s']:.2f} MB/s ({args.build_workers} workers)"
    )

    manifest = work / "shards" / "manifest.json"
    loader = TokenWindowLoader(
        manifest,
        "train",
        bs,
        0,
        1,
        num_workers=args.workers,
        seed=cfg.train.seed,
        tokenizer=tok,
        seq_len=seq_len,
        n_future=n_future,
    )
    reader = reader_rate(loader, args.reader_batches)
    print(f"reader: {reader / 1e6:.2f} M tokens/s ({args.workers} workers, batch {bs}x{m.window})")

    # The same tokens as a flat file: the train split's stream (each window's first S tokens).
    flat = work / "train.bin"
    stream = [b[:, :seq_len].numpy().astype(np.uint16) for b in _one_pass(manifest, bs)]
    np.concatenate(stream).reshape(-1).tofile(flat)
    mmap = memmap_rate(flat, m.window, bs, args.reader_batches)
    print(f"memmap flat file: {mmap / 1e6:.2f} M tokens/s (random windows, in-process)")

    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = MTPModel(cfg.model)
    fixed = [next(iter(loader)) for _ in range(2)]
    trainer, _ = train_rate(model, _cycle(fixed), seq_len, args.steps, args.warmup)
    print(f"trainer (tiny-cpu, {torch.get_num_threads()} threads): {trainer:.0f} tokens/s")
    live, wait = train_rate(model, iter(loader), seq_len, args.steps, args.warmup)
    print(f"trainer fed live by the reader: {live:.0f} tokens/s, {100 * wait:.1f}% waiting")

    ratio = reader / trainer
    print(f"reader / trainer = {ratio:.0f}x (target >= 20x)")
    print(
        json.dumps(
            {
                "tokenizer": kind,
                "vocab_size": tok.vocab_size,
                "seq_len": seq_len,
                "n_future": n_future,
                "batch_size": bs,
                "corpus_mb": round(m.totals["bytes"] / 1e6, 2),
                "builder_mb_per_s": round(build["mb_per_s"], 2),
                "builder_seconds": round(build["seconds"], 2),
                "reader_workers": args.workers,
                "reader_tokens_per_s": round(reader),
                "memmap_tokens_per_s": round(mmap),
                "trainer_tokens_per_s": round(trainer),
                "trainer_live_tokens_per_s": round(live),
                "trainer_live_wait_fraction": round(wait, 4),
                "ratio_reader_vs_trainer": round(ratio, 1),
            }
        )
    )


def _one_pass(manifest: Path, bs: int):
    loader = TokenWindowLoader(manifest, "train", bs, 0, 1, shuffle_buffer=0)
    for i, batch in enumerate(loader):
        yield batch
        if i + 1 == loader.batches_per_epoch():
            return


def _cycle(items: list):
    while True:
        yield from items


if __name__ == "__main__":
    main()
