"""The `mtp` command line: `mtp train RECIPE [key=value ...] [--resume]` and friends.

The only place that reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
it turns it into a `LaunchEnv` and hands that to the distributed layer.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import ConfigError, load_config

# Modules that add their own subcommands with `register(subparsers)`.
_SUBCOMMANDS = (
    "mtp_dist.tokenizers.cli",
    "data_pipeline.cli",
    "mtp_dist.inference.cli",
    "mtp_dist.eval.cli",
    "mtp_dist.distributed.cli",
)


def _launch_env():
    from .distributed import LaunchEnv

    return LaunchEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", 29500)),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .training import Trainer

    cfg = load_config(args.recipe, args.overrides)
    runtime = None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 or args.distributed:
        from .distributed import make_runtime

        runtime = make_runtime(cfg, _launch_env())
    try:
        Trainer(cfg, runtime, resume=args.resume).fit()
    finally:
        if runtime is not None:
            runtime.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a multi-token-prediction model")
    train.add_argument("recipe", nargs="?", default="configs/tiny-cpu.yaml", help="YAML recipe")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument(
        "--distributed",
        action="store_true",
        help="use the distributed runtime even with one process (launchers set WORLD_SIZE)",
    )
    train.set_defaults(func=cmd_train)
    for name in _SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
