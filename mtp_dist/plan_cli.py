"""`mtp plan RECIPE [key=value ...] --gpus N --gpu-memory-gb M [--tflops T] [--mfu F]
[--tokens 91e9] [--json]`: per-rank memory, step time and days to a token budget of a run,
and which layouts fit (mtp_dist/plan.py; docs/plan.md)."""

from __future__ import annotations

import argparse
import json
import os

HELP = "per-rank memory, step time and layouts that fit"


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def register(subparsers) -> None:
    from .config import DEFAULT_RECIPE

    p = subparsers.add_parser("plan", help=HELP, description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="YAML file or recipe name")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--gpus", type=_positive(int), required=True, help="ranks, one GPU each")
    p.add_argument(
        "--gpu-memory-gb",
        type=_positive(float),
        required=True,
        help="memory per GPU in GB (1e9 bytes)",
    )
    # H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA's datasheet); 0.4 MFU is a typical large run.
    p.add_argument(
        "--tflops",
        type=_positive(float),
        default=989.0,
        help="peak dense TFLOP/s per GPU (default 989, H100 SXM bf16)",
    )
    p.add_argument(
        "--mfu",
        type=_positive(float),
        default=0.4,
        help="model FLOPs utilisation assumed (default 0.4)",
    )
    p.add_argument(
        "--tokens", type=_positive(float), default=91e9, help="training token budget (default 91e9)"
    )
    p.add_argument("--top", type=int, default=12, help="fitting layouts listed (default 12)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=run)


def _gb(n: float) -> str:
    return f"{n / 1e9:8.2f}"


def run(args: argparse.Namespace) -> int:
    from .config import DEFAULT_RECIPE, ConfigError, load_config

    recipe, overrides = args.recipe, list(args.overrides)
    if "=" in recipe and not os.path.exists(recipe):  # `mtp plan key=value`: default recipe
        recipe, overrides = DEFAULT_RECIPE, [recipe, *overrides]
    if args.mfu > 1:
        raise ConfigError(f"--mfu {args.mfu}: must be <= 1")
    cfg = load_config(recipe, ["run_dir=plan", *overrides])
    from .plan import Hardware, make_plan, to_json

    hw = Hardware(gpus=args.gpus, memory_gb=args.gpu_memory_gb, tflops=args.tflops, mfu=args.mfu)
    plan = make_plan(cfg, hw, args.tokens, recipe=str(recipe))
    if args.json:
        print(json.dumps(to_json(plan)))
        return 0
    own = plan.layout
    trainable = ""
    if plan.freeze != "none":  # frozen parameters: weights only, no gradients or optimizer
        trainable = f" ({plan.trainable_params / 1e9:.3f} B trainable, train.freeze={plan.freeze})"
    where = f"layout {own.layout.name()} " if own else ""
    n = cfg.model.n_future
    family = f"chained, n_future {n}" if cfg.model.chained else f"{n} heads"
    print(
        f"{recipe}: {plan.params_total / 1e9:.3f} B parameters{trainable}, "
        f"vocab {plan.vocab_size}, {family}, {where}on {args.gpus} GPUs"
    )
    if own is None:  # a question about other GPUs than the recipe's: answered by the candidates
        print(f"{plan.layout_misfit}: the layouts below do")
    else:
        _print_ranks(own, args.gpu_memory_gb)
    step = ""
    if plan.step_seconds is not None:
        step = f"step {plan.step_seconds:.3g} s "
    print(
        f"FLOPs/token {plan.flops_per_token:.3e} "
        f"(with recompute {plan.hardware_flops_per_token:.3e}); "
        f"{step}at MFU {args.mfu:g} x {args.tflops:g} TFLOP/s; "
        f"{plan.tokens_per_day / 1e9:.2f} B tokens/day; {plan.days_to_budget:.3g} days to "
        f"{args.tokens:.3g} tokens"
    )
    by_peak = sorted(plan.candidates, key=lambda c: c.peak_bytes)
    fitting = [c for c in by_peak if c.fits]
    if fitting:
        print(f"{len(fitting)} of {len(plan.candidates)} valid layouts fit; smallest peaks:")
    else:  # the nearest misses tell how much more memory (or how many more GPUs) it takes
        print(
            f"none of {len(plan.candidates)} valid layouts fits {args.gpu_memory_gb:g} GB; "
            "smallest peaks:"
        )
    for c in (fitting or by_peak)[: args.top]:
        print(f"  {c.layout.name():<34} {c.peak_bytes / 1e9:8.2f} GB")
    return 0


def _print_ranks(own, memory_gb: float) -> None:
    """The recipe's layout, stage by stage, and whether its worst rank fits."""
    print(
        f"{'stage':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'acts':>8} {'backward':>8} "
        f"{'heads':>8} {'buckets':>8} {'total':>8}  GB per rank (of {memory_gb:g}; "
        "total = the rest + the larger of backward and heads)"
    )
    for r in own.ranks:
        print(
            f"{r.stage:>5} {_gb(r.weights)} {_gb(r.gradients)} {_gb(r.optimizer)} "
            f"{_gb(r.activations)} {_gb(r.workspace)} {_gb(r.heads)} {_gb(r.buckets)} "
            f"{_gb(r.total)}"
        )
    print(f"fits: {'yes' if own.fits else 'NO'} (peak {own.peak_bytes / 1e9:.2f} GB)")
