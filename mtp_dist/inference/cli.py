"""`mtp generate`: complete a prompt with a trained checkpoint, optionally self-speculatively.

    mtp generate --checkpoint runs/tiny-cpu --prompt "def fib(n):" --max-tokens 64 --speculative

The prompt and its completion go to stdout (`--completion-only`: the completion alone); one line
per decoding mode on stderr: tokens, tokens/s, tokens per forward (`--json`: one JSON line of
statistics instead, with the acceptance rate per head position). `--compare` decodes greedily
with and without self-speculation and says whether the two texts are identical.

The prompt and --max-tokens share the model's context (model.max_seq_len): more --max-tokens than
it holds is an error; a prompt longer than what is left keeps its end, with a warning line saying
how many tokens were cut.
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
    if args.n_draft != "auto" and not 0 <= args.n_draft < heads:
        drafters = "chained modules" if generator.model.cfg.chained else "heads"
        raise ConfigError(
            f"--n-draft {args.n_draft}: must be in 0..{heads - 1} (this model predicts {heads} "
            f"tokens: the next one and {heads - 1} by {drafters} to draft with)"
        )


def _draft_count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint dir"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (default 1)"
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the plain decoding step (torch.compile, static shapes); auto: where the "
        "command decodes enough tokens to pay the compile back (mtp eval's sampled passes, not "
        "one mtp generate), used at the batch sizes where it measures faster than eager",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="precision of the weights (default auto: bf16 on CUDA and on a CPU with native "
        "bf16 matmul where one row of the model's largest matmul runs faster in it, else fp32)",
    )


def make_generator(model, tokenizer, args: argparse.Namespace, tokens: int, command: str):
    """The Generator of --dtype and --compile (for a command decoding about `tokens` tokens);
    warnings on stderr; --compile on where inductor cannot compile is one ConfigError line."""
    from .compiled import CompileError, want_compile
    from .generate import Generator

    compile = want_compile(args.compile, tokens)
    try:
        generator = Generator(model, tokenizer, dtype=args.dtype, compile=compile)
    except CompileError as err:
        if args.compile == "on":
            raise ConfigError(
                f"--compile on: torch.compile cannot build the decoding step here ({err}): "
                "use --compile off"
            ) from None
        print(f"{command}: warning: compiling failed ({err}): decoding eagerly", file=sys.stderr)
        generator = Generator(model, tokenizer, dtype=args.dtype)
    if generator.dtype_warning:
        print(f"{command}: warning: {generator.dtype_warning}", file=sys.stderr)
    return generator


def mode_line(
    name: str, stats, plain_seconds: float | None = None, same=None, drafters: str = "draft heads"
) -> str:
    """One plain line about a decoding run: tokens, speed, tokens per forward (and, for the
    speculative run of --compare, its speed-up and whether its text equals greedy's).
    `drafters`: what drafted ("draft heads", "chained modules")."""
    line = (
        f"{name}: {stats.tokens} tokens in {stats.seconds:.2f} s, "
        f"{stats.tokens / max(stats.seconds, 1e-9):.1f} tokens/s, "
        f"{stats.tokens_per_forward:.2f} tokens per forward"
    )
    if stats.drafts_at_end is not None:
        line += f" ({stats.drafts_at_end} {drafters})"
    if plain_seconds is not None:
        line += f", {plain_seconds / max(stats.seconds, 1e-9):.2f}x plain greedy"
    if same is not None:
        line += f", identical to greedy: {'yes' if same else 'NO'}"
    if stats.plain_because:
        line += f"; drafting does not pay ({stats.plain_because}): decoded plainly"
    if stats.calibration_seconds >= 0.005:
        line += f" [step costs measured first: {stats.calibration_seconds:.2f} s, not counted]"
    return line


def setup_line(generator) -> str:
    """The precision and path decoding runs with, e.g. 'decoding: fp32 (CPU native bf16:
    avx512_bf16), eager step (not compiled), 1 thread'."""
    import torch

    from .precision import describe

    model, dec = generator.model, generator.decoder
    dtype = next(model.parameters()).dtype
    step = (
        f"compiled plain step ({dec.compile_seconds:.1f} s to compile)"
        if dec.compiled and dec.compile_mode == "on"
        else f"compiled plain step where faster ({dec.compile_seconds:.1f} s to compile)"
        if dec.compiled
        else "eager step (not compiled)"
    )
    threads = torch.get_num_threads()
    return (
        f"decoding: {describe(dtype, model.rope_cos.device)}, {step}, "
        f"{threads} thread{'s' if threads > 1 else ''}"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_for_inference
    from .generate import GenerationConfig

    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.checkpoint)
    tokens = args.max_tokens * (2 if args.compare else 1)
    generator = make_generator(model, tokenizer, args, tokens, "mtp generate")
    check_max_tokens(args.max_tokens, generator)
    _check_speculative(args, generator)
    if args.compare and args.temperature > 0:
        raise ConfigError(
            "--compare runs greedy and self-speculative decoding: use --temperature 0"
        )
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    modes = (False, True) if args.compare else (args.speculative,)
    runs = {}
    for speculative in modes:
        config = GenerationConfig(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=tuple(args.stop),
            speculative=speculative,
            n_draft=args.n_draft,
            seed=args.seed,
        )
        [completion], stats = generator.generate([prompt], config)
        runs[speculative] = (completion, stats)
    completion, stats = runs[modes[0]]
    warning = cut_warning([completion.prompt_dropped], args.max_tokens, generator)
    if warning:
        print(f"mtp generate: {warning}", file=sys.stderr)
    text = completion.text if args.completion_only else prompt + completion.text
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    sys.stdout.flush()  # the text before the lines about it, on a terminal showing both
    reports = {
        ("speculative" if spec else "plain"): {"finish_reason": c.finish_reason, **st.as_dict()}
        for spec, (c, st) in runs.items()
    }
    drafters = "chained modules" if model.cfg.chained else "draft heads"
    if not args.json:
        print(setup_line(generator), file=sys.stderr)
    if args.compare:
        same = runs[True][0].tokens == runs[False][0].tokens
        plain_s = runs[False][1].seconds
        print(mode_line("plain greedy", runs[False][1]), file=sys.stderr)
        spec_line = mode_line("self-speculative", runs[True][1], plain_s, same, drafters)
        print(spec_line, file=sys.stderr)
        if args.json:
            print(json.dumps({**reports, "identical_to_greedy": same}), file=sys.stderr)
    else:
        name = "self-speculative" if args.speculative else "plain"
        if args.temperature > 0:
            name = "sampled"
        if args.json:
            print(json.dumps(next(iter(reports.values()))), file=sys.stderr)
        else:
            print(mode_line(name, stats, drafters=drafters), file=sys.stderr)
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
    p.add_argument(
        "--n-draft",
        type=_draft_count,
        default="auto",
        help="draft heads (chained models: modules) to use: a number, or auto (default: as many "
        "as pay by the step costs measured on this machine and the measured acceptance; none "
        "where drafting does not pay: then it decodes plainly and says why)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="decode greedily twice, plain and self-speculative: one line each (speed, tokens "
        "per forward) and whether the texts are identical",
    )
    p.add_argument(
        "--completion-only", action="store_true", help="print the completion without the prompt"
    )
    p.add_argument(
        "--json", action="store_true", help="decoding statistics as one JSON line on stderr"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_generate)
