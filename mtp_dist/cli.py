"""The `mtp` command line: `mtp train [RECIPE] [key=value ...] [--resume]` and friends.

The only place that reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
it turns it into a `LaunchEnv` and hands that to the distributed layer.

A problem the user can fix (a bad option, recipe or override, a missing or corrupt file or
checkpoint, an existing run, an empty corpus) is one line `mtp COMMAND: message` on stderr and
exit status 2; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import DEFAULT_RECIPE, load_config, recipe_names
from .threads import apply_thread_defaults

# name: (module whose `register(subparsers)` adds the command, the help `mtp --help` shows).
# Only the module of the command being run is imported: `mtp --help`, `mtp train` and their
# errors do not pay for torch, DeepSpeed or MLflow.
_SUBCOMMANDS = {
    "tokenizer": ("mtp_dist.tokenizers.cli", "tokenizer tools"),
    "data": ("data_pipeline.cli", "data pipeline tools"),
    "generate": ("mtp_dist.inference.cli", "complete a prompt with a checkpoint"),
    "eval": ("mtp_dist.eval.cli", "HumanEval / MBPP pass@k of a checkpoint"),
    "heldout": ("mtp_dist.eval.heldout_cli", "bits per byte on held-out code vs gzip / xz"),
    "repro": ("mtp_dist.repro.cli", "reproduce one of the paper's small-scale findings"),
    "checkpoint": ("mtp_dist.checkpoint.cli", "checkpoint tools"),
    "export": ("mtp_dist.checkpoint.export_cli", "write a checkpoint in another format"),
    "import": ("mtp_dist.checkpoint.import_cli", "read a model from another format"),
    "plan": ("mtp_dist.plan_cli", "per-rank memory, step time and layouts that fit"),
}

# The errors whose message is the whole story, by module: an error can only be one of these if
# its module was imported, so looking them up costs no import.
_USER_ERRORS = {
    "builtins": ("FileNotFoundError",),
    "mtp_dist.config": ("ConfigError",),
    "mtp_dist.checkpoint.layout": ("CheckpointError",),
    "mtp_dist.tokenizers.base": ("TokenizerError",),
    "mtp_dist.training.trainer": ("TrainingAborted",),
    "mtp_dist.distributed.topology": ("TopologyError",),
    "data_pipeline.manifest": ("ManifestError",),
    "data_pipeline.reader": ("ShardError",),
}

EPILOG = """exit status: 0 done; 2 a problem with the input, explained in one line
`mtp COMMAND: message` (bad option, recipe or override, missing or corrupt file or checkpoint,
a run that already exists, an empty corpus, training aborted on non-finite losses); 1 a bug,
shown with its traceback; 130 interrupted (Ctrl-C). MTP_DEBUG=1 shows the traceback of input
problems too."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of `mtp` (subparsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """`mtp --version`: asks git only when the option is given, not on every command."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import version_string

        print(version_string())
        parser.exit(0)


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
    recipe, overrides = args.recipe, list(args.overrides)
    if "=" in recipe and not os.path.exists(recipe):  # `mtp train key=value`: default recipe
        recipe, overrides = DEFAULT_RECIPE, [recipe, *overrides]
    model_base = None
    if args.init_from:  # the checkpoint's model is the starting point of the recipe's
        from .checkpoint.layout import resolve_checkpoint

        model_base = load_config(resolve_checkpoint(args.init_from) / "config.yaml").model
    # before the heavy imports: config errors are quick
    cfg = load_config(recipe, overrides, model_base)
    from .distributed.topology import check_launch

    world = int(os.environ.get("WORLD_SIZE", 1))
    check_launch(cfg, world)  # the layout against the launch, before any process group
    from .training import Trainer
    from .training.runtime import check_device

    distributed = world > 1 or args.distributed
    check_device(cfg, distributed)
    runtime = None
    if distributed:
        from .distributed import make_runtime

        runtime = make_runtime(cfg, _launch_env())
    if not args.verbose:
        from .tracking import quiet_library_logs

        quiet_library_logs()
    try:
        trainer = Trainer(cfg, runtime, resume=args.resume, init_from=args.init_from)
        trainer.fit()
    finally:
        if runtime is not None:
            runtime.close()
    if trainer.interrupts and trainer.step < trainer.cfg.train.max_steps:
        # a first Ctrl-C: stopped early with a checkpoint, and still an interruption
        print(
            f"mtp train: interrupted at step {trainer.step} (checkpointed; --resume continues)",
            file=sys.stderr,
        )
        return 130
    return 0


def build_parser(load: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The `mtp` parser with the subcommands named in `load` complete (None: all); the others
    are listed with their help only."""
    parser = _Parser(
        prog="mtp",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", nargs=0, action=_Version, help="print the version and git commit, and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a multi-token-prediction model", epilog=EPILOG)
    train.add_argument(
        "recipe",
        nargs="?",
        default=DEFAULT_RECIPE,
        help=f"YAML file or shipped recipe name (default {DEFAULT_RECIPE}; shipped: "
        f"{', '.join(recipe_names())})",
    )
    train.add_argument("overrides", nargs="*", help="config overrides, key=value")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument(
        "--init-from",
        metavar="RUN_OR_CKPT",
        help="start a fresh run from this checkpoint's weights and tokenizer (not a resume)",
    )
    train.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the INFO lines of MLflow, alembic and DeepSpeed too",
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="use the distributed runtime even with one process (launchers set WORLD_SIZE)",
    )
    train.set_defaults(func=cmd_train)
    for name, (module, summary) in _SUBCOMMANDS.items():
        if load is None or name in load:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    words = [a for a in argv if not a.startswith("-")]
    parser = build_parser(load=tuple(words[:1]))
    args, rest = parser.parse_known_args(argv)
    # argparse fills the positionals before the first option: overrides typed after `--resume`
    # are left over. They are overrides all the same.
    if args.command == "train":
        args.overrides += [a for a in rest if not a.startswith("-")]
        rest = [a for a in rest if a.startswith("-")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _is_user_error(err: BaseException) -> bool:
    types = tuple(
        getattr(sys.modules[module], name)
        for module, names in _USER_ERRORS.items()
        if module in sys.modules
        for name in names
    )
    return isinstance(err, types)


def main(argv: list[str] | None = None) -> int:
    apply_thread_defaults()  # before _parse imports a command's module, and torch with it
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    sub = getattr(args, f"{args.command}_command", None)  # `mtp data build`: "data build"
    command = f"{args.command} {sub}" if sub else args.command
    debug = os.environ.get("MTP_DEBUG") == "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mtp {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not _is_user_error(err):
            raise
        print(f"mtp {command}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
