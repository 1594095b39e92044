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

    python bench/data.py --parts 4 [--sample-mb 1 3 12] [--seq-len 4096]

The scale-out instead: the tokenizer trained on bounded samples (seconds, peak RSS of a process
doing only that), then the corpus built once (`mtp data build`) and as N parts (`--part I/N`,
one after another with the same workers, as N machines would run them) plus `mtp data merge`.
The merged manifest is checked to equal the one-machine build's. JSON keys: `one_build_cpu_s`,
`part_cpu_s` (each part), `merge_cpu_s` (and their wall times, `*_s`), `ratio_scaled_vs_one` =
CPU seconds of (slowest part + merge) / one build: the time on N machines where CPU is what a
build waits for (wall times here are those of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import (
    STDLIB_EXCLUDE,
    Manifest,
    TokenWindowLoader,
    build_shards,
    list_files,
    merge_parts,
    stdlib_root,
)
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


# A fresh process, so that its peak RSS (VmHWM: per address space, unlike ru_maxrss, which a
# child inherits from the parent that forked it) is the imports' and then the training's alone.
SAMPLE_PROBE = """
import sys
from data_pipeline import STDLIB_EXCLUDE, sample_texts, stdlib_root
from mtp_dist.tokenizers import train_sentencepiece
def status(key):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key))
mb, out, vocab = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # restart VmHWM from here: the training's peak
    f.write("5")
texts = sample_texts([stdlib_root()], ["**/*.py"], STDLIB_EXCLUDE, int(mb * 1e6))
train_sentencepiece(texts, out, vocab)
print(base, status("VmHWM"))
"""


def sample_training(mb: float, out: Path, vocab: int) -> tuple[float, int, int]:
    """(seconds, RSS after the imports, peak RSS) of a process training the tokenizer on an
    mb-MB sample of the demo corpus."""
    start = time.perf_counter()
    cmd = [sys.executable, "-c", SAMPLE_PROBE, str(mb), str(out), str(vocab)]
    base, peak = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return time.perf_counter() - start, int(base), int(peak)


def mtp(*args: str) -> tuple[float, float]:
    """(wall, CPU seconds) of `mtp ARGS` in a fresh process, its worker processes included (as a
    part runs on its machine; in-process, the workers' spawn would re-import this benchmark)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, "-m", "mtp_dist.cli", *args], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.perf_counter() - start, cpu


def scale_out(args: argparse.Namespace, cfg, work: Path) -> None:
    seq_len, n_future = cfg.data.seq_len, cfg.model.n_future
    vocab, rows = cfg.data.sp_vocab_size, []
    for mb in args.sample_mb:
        seconds, base, peak = sample_training(mb, work / f"tok-{mb}", vocab)
        above = (peak - base) / 1e6
        rows.append(
            {"sample_mb": mb, "seconds": round(seconds, 1), "rss_above_imports_mb": round(above)}
        )
        print(
            f"tokenizer on a {mb} MB sample: {seconds:.1f}s, peak RSS {peak / 1e6:.0f} MB "
            f"({above:.0f} MB above the {base / 1e6:.0f} MB after the imports)"
        )
    build = [stdlib_root(), "--tokenizer", str(work / f"tok-{args.sample_mb[-1]}"), "--quiet"]
    build += ["--seq-len", str(seq_len), "--n-future", str(n_future)]
    build += ["--workers", str(args.build_workers)]
    build += [x for glob in STDLIB_EXCLUDE for x in ("--exclude", glob)]
    one_s, one_cpu = mtp("data", "build", *build, "--out", str(work / "one"))
    print(f"one build: {one_s:.1f}s wall, {one_cpu:.1f}s CPU ({args.build_workers} workers)")
    part_s, part_cpu, dirs = [], [], [str(work / f"part-{i}") for i in range(args.parts)]
    for i, d in enumerate(dirs):
        wall, cpu = mtp("data", "build", *build, "--out", d, "--part", f"{i}/{args.parts}")
        part_s.append(wall)
        part_cpu.append(cpu)
    merge_s, merge_cpu = mtp("data", "merge", *dirs, "--out", str(work / "merged"), "--quiet")
    one = Manifest.load(work / "one")
    assert Manifest.load(work / "merged").to_json() == one.to_json(), "merge != one build"
    # In this process too: the merge's own rate per CPU second, without a process start-up.
    cpu = time.process_time()
    merged = merge_parts(dirs, work / "merged2", progress=False)
    merge_rate = merged.totals["tokens"] / (time.process_time() - cpu)
    ratio = (max(part_cpu) + merge_cpu) / one_cpu
    print(
        f"{args.parts} parts: wall {', '.join(f'{t:.1f}' for t in part_s)}s; CPU "
        f"{', '.join(f'{t:.1f}' for t in part_cpu)}s (sum {sum(part_cpu):.1f}s); merge "
        f"{merge_s:.2f}s wall, {merge_cpu:.2f}s CPU (in-process: {merge_rate / 1e6:.1f} M tokens "
        "per CPU second)"
    )
    print(
        f"on {args.parts} machines (CPU): slowest part + merge = {ratio:.2f} of the one build; "
        "merged manifest == one build's"
    )
    print(
        json.dumps(
            {
                "corpus_mb": round(one.totals["bytes"] / 1e6, 2),
                "tokens": one.totals["tokens"],
                "seq_len": seq_len,
                "vocab_size": one.tokenizer["vocab_size"],
                "build_workers": args.build_workers,
                "tokenizer_samples": rows,
                "one_build_s": round(one_s, 2),
                "one_build_cpu_s": round(one_cpu, 2),
                "parts": args.parts,
                "part_s": [round(t, 2) for t in part_s],
                "part_cpu_s": [round(t, 2) for t in part_cpu],
                "merge_s": round(merge_s, 2),
                "merge_cpu_s": round(merge_cpu, 2),
                "merge_tokens_per_cpu_s": round(merge_rate),
                "ratio_scaled_vs_one": round(ratio, 3),
            }
        )
    )


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
    parser.add_argument("--parts", type=int, default=0, help="measure the scale-out instead")
    parser.add_argument("--sample-mb", type=float, nargs="+", default=[1.0, 3.0, 12.0])
    parser.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args()
    cfg = load_config(args.recipe)
    cfg.data.seq_len = args.seq_len or cfg.data.seq_len
    seq_len, n_future, bs = cfg.data.seq_len, cfg.model.n_future, cfg.train.micro_batch_size
    kind = args.tokenizer or cfg.data.tokenizer
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mtp_bench_data_"))
    if args.parts:
        scale_out(args, cfg, work)
        return
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
