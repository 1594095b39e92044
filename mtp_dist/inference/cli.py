"""`mtp generate`: complete a prompt with a trained checkpoint, optionally self-speculatively.

    mtp generate --checkpoint runs/tiny-cpu --prompt "def fib(n):" --max-tokens 64 --speculative

The completion goes to stdout; decoding statistics (tokens per forward, acceptance rate per head
position, speed) go to stderr as one JSON line. The prompt and --max-tokens share the model's
context (model.max_seq_len): more --max-tokens than it holds is an error; a prompt longer than
what is left keeps its end, with a warning line saying how many tokens were cut.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError


def _number(convert, ok, need: str):
    """An argparse type: `convert` the text, and require `ok` of the value."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {value}")
        return value

    return parse


positive_int = _number(int, lambda x: x >= 1, ">= 1")
nonnegative_int = _number(int, lambda x: x >= 0, ">= 0")
nonnegative_float = _number(float, lambda x: x >= 0, ">= 0")
probability = _number(float, lambda x: 0 < x <= 1, "in (0, 1]")


def check_max_tokens(max_tokens: int, generator) -> None:
    """--max-tokens must leave one prompt token of the model's context."""
    if max_tokens > generator.max_new_tokens:
        raise ConfigError(
            f"--max-tokens {max_tokens}: more than this model's context allows (model.max_seq_len"
            f"={generator.model.cfg.max_seq_len} holds the prompt and the new tokens; at most "
            f"{generator.max_new_tokens})"
        )


def cut_warning(dropped: list[int], max_tokens: int, generator) -> str | None:
    """One line about the prompts cut to fit the context (None if none was)."""
    cut = [n for n in dropped if n]
    if not cut:
        return None
    context = generator.model.cfg.max_seq_len
    if len(dropped) == 1:
        which, what = "the prompt is", f"its first {cut[0]} tokens were dropped"
    else:
        which = f"{len(cut)} of {len(dropped)} prompts are"
        what = f"up to {max(cut)} tokens were dropped from their start"
    return (
        f"warning: {which} longer than the {context - max_tokens} tokens model.max_seq_len="
        f"{context} leaves beside --max-tokens {max_tokens}: {what}"
    )


def _check_speculative(args: argparse.Namespace, generator) -> None:
    heads = generator.model.cfg.n_future
    if args.speculative and args.temperature > 0:
        raise ConfigError("--speculative decodes greedily: it needs --temperature 0")
    if args.n_draft is not None and not 0 <= args.n_draft < heads:
        raise ConfigError(
            f"--n-draft {args.n_draft}: must be in 0..{heads - 1} (this model has {heads} heads: "
            f"the next-token one and {heads - 1} to draft with)"
        )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint dir"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (default 1)"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_for_inference
    from .generate import GenerationConfig, Generator

    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.checkpoint)
    generator = Generator(model, tokenizer)
    check_max_tokens(args.max_tokens, generator)
    _check_speculative(args, generator)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    config = GenerationConfig(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=tuple(args.stop),
        speculative=args.speculative,
        n_draft=args.n_draft,
        seed=args.seed,
    )
    [completion], stats = generator.generate([prompt], config)
    warning = cut_warning([completion.prompt_dropped], args.max_tokens, generator)
    if warning:
        print(f"mtp generate: {warning}", file=sys.stderr)
    sys.stdout.write(completion.text + ("" if completion.text.endswith("\n") else "\n"))
    report = {"finish_reason": completion.finish_reason, **stats.as_dict()}
    print(json.dumps(report), file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a checkpoint")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=128,
        help="most tokens to generate (the prompt keeps model.max_seq_len less this)",
    )
    p.add_argument(
        "--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default)"
    )
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass")
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable); cut before it"
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="greedy self-speculative decoding with the extra heads (same output, fewer forwards)",
    )
    p.add_argument("--n-draft", type=int, default=None, help="draft heads to use (default all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_generate)
