"""`mtp generate`: complete a prompt with a trained checkpoint, optionally self-speculatively.

    mtp generate --checkpoint runs/tiny-cpu --prompt "def fib(n):" --max-tokens 64 --speculative

The completion goes to stdout; decoding statistics (tokens per forward, acceptance rate per head
position, speed) go to stderr as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint dir"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_for_inference
    from .generate import GenerationConfig, Generator

    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.checkpoint)
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
    [completion], stats = Generator(model, tokenizer).generate([prompt], config)
    sys.stdout.write(completion.text + ("" if completion.text.endswith("\n") else "\n"))
    report = {"finish_reason": completion.finish_reason, **stats.as_dict()}
    print(json.dumps(report), file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a checkpoint")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
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
