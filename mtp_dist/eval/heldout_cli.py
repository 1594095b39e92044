"""`mtp heldout`: head-1 bits per byte of a checkpoint on held-out code, against gzip -9 and
xz -9e, and per-head top-1 accuracy (bench/quality.py is this command with --json).

    mtp heldout --checkpoint runs/tiny-cpu            # 60 files of CPython's own test suite
    mtp heldout --checkpoint RUN --files DIR --limit 10 --context 256
    mtp heldout --compressors-only                    # gzip/xz only, no model

Held-out files: CPython's own test suite by default (the stdlib training corpus leaves it out,
data_pipeline.STDLIB_EXCLUDE), the first --limit usable .py files in sorted order. Every file
token is scored once by strided windows of the training context (quality.py); per-head top-1
accuracy on the same windows. The results are added to the training run's MLflow metrics as
heldout/* (unless --no-mlflow), so runs compare on them beside their training curves.

Progress goes to stderr as lines (a start line, then one at most every 10 s), which a Slurm log
or a pipe shows as well as a terminal does. gzip and xz compress each file on its own, as the
model scores each on its own, so each file pays their container (18 / ~56 bytes): the table says
how much of their bits that is and marks a figure where it passes 10%.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

HEADLINE = ("bits_per_byte", "gzip_bits_per_byte", "xz_bits_per_byte", "bits_per_token")
"""Results added to the training run's MLflow metrics as heldout/<key> (unless --no-mlflow)."""

CONTAINER_HEAVY = 0.10
"""A compressor's figure is marked `*` when more than this share of its bits is container."""

PROGRESS_EVERY_S = 10.0


def _fail(prefix: str, message: str) -> None:
    print(f"{prefix}: {message}", file=sys.stderr)
    sys.exit(2)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        return ""


def counts(skipped: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"


def fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def print_table(r: dict, skipped: dict, seconds: float) -> None:
    from .quality import COMPRESSORS

    cells, marked = [fmt(r["bits_per_byte"])], False
    for name in COMPRESSORS:
        heavy = (r[f"{name}_container_share"] or 0) > CONTAINER_HEAVY
        marked |= heavy
        cells.append(fmt(r[f"{name}_bits_per_byte"]) + ("*" if heavy else ""))
    print("| metric | model | gzip -9 | xz -9e |\n|---|---:|---:|---:|")
    print("| bits/byte, total | " + " | ".join(cells) + " |")
    for i, acc in enumerate(r["head_accuracy"]):
        print(f"| head {i + 1} top-1 accuracy (t+{i + 1}) | {acc:.3f} | | |")
    print(f"| bits/token (head 1) | {fmt(r['bits_per_token'])} | | |")
    shares = " / ".join(f"{100 * r[f'{n}_container_share']:.1f}%" for n in COMPRESSORS)
    without = " / ".join(
        fmt(r[f"{n}_bits_per_byte"] * (1 - r[f"{n}_container_share"])) for n in COMPRESSORS
    )
    # The per-file mean is left out: a 47-byte file would weigh as much as a 264 KB one, and
    # for gzip / xz it mostly measured their containers (7.5 / 11.6 bits/byte on tiny files).
    print(
        "\nbits/byte, total: all files' bits over all their bytes.\n"
        "gzip -9 / xz -9e compress each file on its own (as `gzip -9 FILE | wc -c`), so each"
        f" file pays their container (18 / ~56 bytes): {shares} of their bits here; without"
        f" it {without}."
    )
    if marked:
        print(f"* over {CONTAINER_HEAVY:.0%} container: files too small to compare compression on")
    print(
        f"files {r['files']} (skipped: {counts(skipped)}), bytes {r['bytes']}, "
        f"tokens {fmt(r['tokens'], 'd')}, bytes/token {fmt(r['bytes_per_token'], '.2f')}, "
        f"context {r['context']}, stride {r['stride']}, {seconds:.1f} s"
    )


def progress_lines(prefix: str, n_files: int, n_bytes: int, every_s: float = PROGRESS_EVERY_S):
    """quality.evaluate's progress as lines on stderr: one now, then after a file at most every
    `every_s` seconds, and after the last. A tqdm bar stays silent where stderr is not a
    terminal (a Slurm log): a 60-file run printed nothing for minutes."""
    start = last = time.perf_counter()
    say = lambda text: print(f"{prefix}: {text}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"scoring {n_files} file{'s' * (n_files != 1)}, {n_bytes:,} bytes")

    def report(done: int, done_bytes: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s or done == n_files:
            last = now
            share = 100 * done_bytes / max(n_bytes, 1)
            say(f"scored {done}/{n_files} files ({share:.0f}% of the bytes), {now - start:.1f} s")

    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .quality import HELD_OUT

    p.add_argument("--checkpoint", help="run or checkpoint directory")
    p.add_argument("--files", default=str(HELD_OUT), help="directory of held-out .py files")
    p.add_argument("--limit", type=int, default=60, help="number of files")
    p.add_argument("--context", type=int, help="window length (default: training data.seq_len)")
    p.add_argument("--stride", type=int, help="new tokens per window (default: context // 2)")
    p.add_argument("--batch", type=int, default=16, help="windows per forward")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--compressors-only", action="store_true", help="skip the model")
    p.add_argument(
        "--no-mlflow", action="store_true", help="do not add the results to the training run"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON line last")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError, load_for_inference, resolve_checkpoint
    from ..config import load_config
    from ..tokenizers import load_tokenizer
    from ..tracking import log_to_training_run
    from .quality import evaluate, select_files

    fail = lambda message: _fail(args.prefix, message)  # noqa: E731

    torch.set_num_threads(args.threads)
    model = tokenizer = ckpt = None
    context = stride = None
    if args.checkpoint is None and not args.compressors_only:
        fail("--checkpoint is required (or --compressors-only)")
    try:
        if args.checkpoint is not None:
            ckpt = resolve_checkpoint(args.checkpoint)
            tokenizer = load_tokenizer(ckpt / "tokenizer")
        if not args.compressors_only:
            model, tokenizer = load_for_inference(ckpt, device=args.device)
            context = args.context
            if context is None:
                context = load_config(ckpt / "config.yaml").data.seq_len
            if not 1 <= context <= model.cfg.max_seq_len:
                fail(
                    f"--context {context} must be in [1, model.max_seq_len={model.cfg.max_seq_len}]"
                )
            stride = max(1, context // 2) if args.stride is None else args.stride
            if not 1 <= stride <= context:
                fail(f"--stride {stride} must be in [1, context={context}]")
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    files, skipped = select_files(args.files, args.limit, tokenizer)
    if not files:
        fail(f"no usable .py files under {args.files} (skipped: {counts(skipped)})")

    start = time.perf_counter()
    report = evaluate(
        files,
        model,
        tokenizer,
        context=context,
        stride=stride,
        batch_windows=args.batch,
        progress=progress_lines(args.prefix, len(files), sum(len(f.data) for f in files)),
    )
    seconds = time.perf_counter() - start
    print_table(report, skipped, seconds)
    report.update(
        skipped=dict(skipped),
        files_dir=args.files,
        seconds=round(seconds, 2),
        checkpoint=None if ckpt is None else str(ckpt),
        machine={
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu": cpu_name(),
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
        },
    )
    if model is not None and not args.no_mlflow:
        metrics = {f"heldout/{k}": report[k] for k in HEADLINE}
        metrics |= {
            f"heldout/head{i + 1}_accuracy": a for i, a in enumerate(report["head_accuracy"])
        }
        tags = {"heldout.files": f"{report['files']} files of {args.files}"}
        run_id = log_to_training_run(ckpt, metrics, tags)
        if run_id:
            print(f"mlflow: heldout/* metrics added to the training run {run_id}", file=sys.stderr)
    if model is not None:
        gzip_bpb = report["gzip_bits_per_byte"]
        print(
            f"held-out code: {report['bits_per_byte']:.3f} bits/byte (gzip -9 {gzip_bpb:.3f}): "
            + ("below" if report["bits_per_byte"] < gzip_bpb else "not below")
            + " gzip"
        )
    if args.json:
        print(json.dumps(report))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("heldout", help="bits per byte on held-out code vs gzip / xz")
    add_arguments(p)
    p.set_defaults(func=run, prefix="mtp heldout")


def bench_main(argv: list[str] | None = None) -> None:
    """bench/quality.py: the same command, its errors prefixed `quality:`, JSON last."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(prefix="quality")
    args = p.parse_args(argv)
    args.json = True
    sys.exit(run(args))
