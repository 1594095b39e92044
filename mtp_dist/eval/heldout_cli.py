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
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

HEADLINE = ("bits_per_byte", "gzip_bits_per_byte", "xz_bits_per_byte", "bits_per_token")
"""Results added to the training run's MLflow metrics as heldout/<key> (unless --no-mlflow)."""


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
    print("| metric | model | gzip -9 | xz -9e |\n|---|---:|---:|---:|")
    for label, key in (("bits/byte, total", ""), ("bits/byte, file mean", "_file_mean")):
        cells = [fmt(r[f"{name}bits_per_byte{key}"]) for name in ("", "gzip_", "xz_")]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for i, acc in enumerate(r["head_accuracy"]):
        print(f"| head {i + 1} top-1 accuracy (t+{i + 1}) | {acc:.3f} | | |")
    print(f"| bits/token (head 1) | {fmt(r['bits_per_token'])} | | |")
    print(
        f"\nfiles {r['files']} (skipped: {counts(skipped)}), bytes {r['bytes']}, "
        f"tokens {r['tokens']}, bytes/token {fmt(r['bytes_per_token'], '.2f')}, context "
        f"{r['context']}, stride {r['stride']}, {seconds:.1f} s"
    )


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
        progress=sys.stderr.isatty(),
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
