"""`mtp eval`: HumanEval and MBPP pass@k of a checkpoint, to stdout, a JSON file and MLflow.

    mtp eval --checkpoint runs/tiny-cpu --benchmark both --samples 10 --k 1,10
    mtp eval --references --benchmark both      # harness self-test: reference solutions, 1.0

A checkpoint's results go to <run_dir>/eval/ and its MLflow store; the self-test writes nothing
(it has no run directory, and the current directory is not one) unless --out or --mlflow-uri
says where.

See docs/eval.md for the protocol and the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..config import ConfigError
from ..inference.cli import (
    check_max_tokens,
    cut_warning,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    probability,
)

DEFAULT_MAX_TOKENS = 256


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        msg = f"--k: expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("--k: values must be >= 1")
    return ks


def _report_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=str) + "\n"


def _mlflow_log(uri: str, run_name: str, report: dict, name: str, artifacts_dir: Path) -> None:
    """One MLflow run with the metrics and the JSON report as the artifact `name` (written
    from memory: the self-test may have no file of it)."""
    import mlflow

    from ..tracking import use_mlflow

    use_mlflow(uri, "mtp_dist", artifacts_dir)
    with mlflow.start_run(run_name=run_name, tags={"kind": "eval"}):
        mlflow.log_params({k: str(v) for k, v in report["config"].items()})
        for bench, result in report["results"].items():
            for key, value in result.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    mlflow.log_metric(f"{bench}/{key.replace('@', '_at_')}", value)
        mlflow.log_text(_report_json(report), name)


def _shown(metrics: dict) -> str:
    """`problems=3 pass@1=0.3333 ...`: what was computed; a pass@k with fewer than k samples
    (None in the JSON) is left out rather than printed as None."""
    return " ".join(
        f"{k}={round(v, 4) if isinstance(v, float) else v}"
        for k, v in metrics.items()
        if v is not None
    )


def _generator(args: argparse.Namespace):
    """(checkpoint directory, Generator) of --checkpoint, checked against --max-tokens."""
    import torch

    from ..checkpoint import load_for_inference, resolve_checkpoint
    from ..inference.cli import make_generator
    from .benchmarks import load_benchmark

    torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(args.checkpoint)
    benches = ["humaneval", "mbpp"] if args.benchmark == "both" else [args.benchmark]
    problems = sum(len(load_benchmark(b)[: args.limit]) for b in benches)
    tokens = problems * (args.samples + 1) * (args.max_tokens or DEFAULT_MAX_TOKENS)
    gen = make_generator(*load_for_inference(ckpt), args, tokens, "mtp eval")
    if args.max_tokens is None:  # the default: 256, or half the context of a smaller model
        args.max_tokens = min(DEFAULT_MAX_TOKENS, gen.model.cfg.max_seq_len // 2)
    check_max_tokens(args.max_tokens, gen)
    return ckpt, gen


def cmd_eval(args: argparse.Namespace) -> int:
    from .benchmarks import load_benchmark
    from .harness import EvalConfig, evaluate, reference_completions
    from .sandbox import Limits, Sandbox

    if args.checkpoint is None and not args.references:
        raise ConfigError("give --checkpoint (or --references for the self-test)")
    benches = ["humaneval", "mbpp"] if args.benchmark == "both" else [args.benchmark]
    cfg = EvalConfig(
        ks=args.k,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
        speculative=args.speculative,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
    )
    sandbox = Sandbox(Limits(timeout_s=args.timeout), slots=max(args.workers, 1))
    run_dir = None
    dropped: dict[str, int] = {}  # prompt -> tokens cut from its start to fit the context
    if args.references:
        cfg.samples, cfg.ks = 0, (1,)
    else:
        ckpt, gen = _generator(args)
        cfg.max_tokens = args.max_tokens
        run_dir = ckpt.parent.parent

        def complete(prompts, c):
            completions = gen.generate(prompts, c)[0]
            dropped.update((p, x.prompt_dropped) for p, x in zip(prompts, completions))
            return [x.text for x in completions]

    report = {
        "checkpoint": None if args.references else str(ckpt),
        "config": {"benchmark": args.benchmark, "limit": args.limit, **vars(cfg)},
        "isolation": sandbox.isolation,
        "results": {},
        "problems": {},
    }
    for bench in benches:
        problems = load_benchmark(bench)[: args.limit]
        if args.references:
            complete = reference_completions(problems)
        result = evaluate(complete, problems, cfg, sandbox)
        if not args.references:
            cut = [dropped[p.prompt] for p in problems]
            warning = cut_warning(cut, args.max_tokens, gen)
            if warning:
                print(f"mtp eval: {bench}: {warning}", file=sys.stderr)
        report["results"][bench] = result["metrics"]
        report["problems"][bench] = result["problems"]
        print(f"{bench}: {_shown(result['metrics'])}", flush=True)
    unsampled = [k for k in cfg.ks if 1 < k and 0 < cfg.samples < k]
    if unsampled:  # asked for samples, but too few for these k
        ks = ", ".join(f"pass@{k}" for k in unsampled)
        print(f"mtp eval: {ks} not computed: needs --samples >= k", file=sys.stderr)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.references:  # no run directory: only where the user says
        out = Path(args.out) if args.out else None
        uri = None if args.no_mlflow else args.mlflow_uri
    else:
        out = Path(args.out or run_dir / "eval" / f"eval-{stamp}.json")
        uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        uri = None if args.no_mlflow else uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_report_json(report))
        print(f"results: {out}")
    if uri is not None:
        name = "eval-references" if args.references else f"eval-{run_dir.name}-{ckpt.name}"
        # Where a sqlite store's new experiment keeps its artifacts: beside the JSON, or else
        # beside the database (a server's experiments have their own place).
        beside = out or Path(uri.removeprefix("sqlite:///"))
        artifact = out.name if out else f"{name}.json"
        _mlflow_log(uri, name, report, artifact, beside.parent / "mlartifacts")
        print(f"mlflow: {uri} (experiment mtp_dist, run {name})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="HumanEval / MBPP pass@k of a checkpoint")
    p.add_argument("--checkpoint", help="run directory (latest checkpoint) or checkpoint dir")
    p.add_argument("--benchmark", choices=["humaneval", "mbpp", "both"], default="both")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="first N problems of each benchmark"
    )
    p.add_argument(
        "--samples",
        type=nonnegative_int,
        default=200,
        help="sampled completions per problem for k > 1",
    )
    p.add_argument(
        "--temperature", type=nonnegative_float, default=0.8, help="sampling temperature (k > 1)"
    )
    p.add_argument("--top-p", type=probability, default=0.95, help="nucleus mass for sampling")
    p.add_argument("--k", type=_ks, default=(1, 10, 100), help="pass@k values, e.g. 1,10,100")
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help=f"most tokens per completion (default {DEFAULT_MAX_TOKENS}, or half the context of a "
        "model with less; the prompt keeps model.max_seq_len less this)",
    )
    p.add_argument("--speculative", action="store_true", help="greedy pass self-speculatively")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts decoded together")
    p.add_argument(
        "--out",
        help="JSON results file (default <run_dir>/eval/eval-<time>.json; --references: none)",
    )
    p.add_argument(
        "--timeout", type=float, default=20.0, help="wall-clock seconds per check (default 20)"
    )
    p.add_argument("--workers", type=int, default=2, help="checks run at the same time")
    p.add_argument(
        "--mlflow-uri",
        help="default: $MLFLOW_TRACKING_URI, else <run_dir>/mlflow.db (--references: none)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="precision of the weights (as mtp generate's --dtype)",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the plain decoding step (as mtp generate's --compile; auto: where this "
        "evaluation decodes 100,000 tokens or more)",
    )
    p.add_argument(
        "--references",
        action="store_true",
        help="score the reference solutions instead of a model (harness self-test)",
    )
    p.set_defaults(func=cmd_eval)
