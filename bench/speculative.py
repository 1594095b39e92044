"""Self-speculative decoding vs plain greedy: tokens per forward, wall-clock speedup, efficiency.

    python bench/speculative.py --checkpoint runs/tiny-cpu            # the tiny-cpu recipe, n=4

Same model, same prompts, one run: every prompt is decoded by plain greedy and by
self-speculative decoding (alternately, best of --repeats each, so that load from other
processes hits both alike), alone and in batches of --batch prompts of different lengths.
Prompts are the openings of held-out Python files — by default CPython's own test suite (its
test_*.py), which the stdlib training corpus leaves out (data_pipeline.STDLIB_EXCLUDE); with
--files DIR, every .py file under DIR (recursively, in sorted order). Reports tokens per forward,
acceptance rate per head position, speedup, efficiency = speedup / tokens per forward (the
paper: 3.05 / 3.50 = 0.87), and whether every output equals plain greedy. The last line printed
is one JSON object.

Both families: --checkpoint may be a parallel (`model.mtp_arch=parallel`) or a chained model;
--chain-checkpoint DIR measures a second one (normally the chained model trained like the first)
in the same run and adds its results under the JSON key "chained" (the same keys as the top
level's; `accepted_drafts_per_position` is the serving engines' per-position counter).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

from mtp_dist.checkpoint import load_for_inference, resolve_checkpoint
from mtp_dist.inference import Decoder, Stopper
from mtp_dist.tracking import log_to_training_run

HELD_OUT = Path(sysconfig.get_paths()["stdlib"]) / "test"
MIN_TOKENS = 16
"""Files shorter than this (in tokens) make no prompt."""


def held_out_files(directory: str | None) -> list[Path]:
    """CPython's test_*.py by default; else every .py file under `directory`, sorted. Exits
    with one line on stderr if there are none."""
    if directory is None:
        root, kind = HELD_OUT, "test_*.py"
        files = sorted(root.glob(kind))
    else:
        root, kind = Path(directory), ".py"
        files = sorted(p for p in root.rglob("*.py") if p.is_file())
    if not root.is_dir():
        sys.exit(f"speculative.py: no usable .py files in {root}: it is not a directory")
    if not files:
        sys.exit(f"speculative.py: no usable .py files in {root}: it contains no {kind} file")
    return files


def held_out_prompts(tokenizer, files: list[Path], count: int, tokens: int) -> list[list[int]]:
    """[EOS] + the first `tokens` tokens of each file (lengths vary: short files stay short)."""
    prompts = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text)[:tokens]
        if len(ids) >= MIN_TOKENS:
            prompts.append([tokenizer.eos_id] + ids[: tokens - 8 * (len(prompts) % 4)])
        if len(prompts) == count:
            break
    return prompts


def timed(dec: Decoder, prompts, speculative: bool, args, eos: int):
    """(wall seconds, CPU seconds of this process, DecodeResult)."""
    stoppers = [Stopper(eos_id=eos) for _ in prompts]
    wall, cpu = time.perf_counter(), time.process_time()
    out = dec.run(
        prompts,
        max_new_tokens=args.max_tokens,
        speculative=speculative,
        n_draft=args.n_draft if speculative else None,
        stoppers=stoppers,
    )
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(dec: Decoder, groups: list[list[list[int]]], args, eos: int) -> dict:
    """Plain vs speculative over prompt groups (each group decoded as one batch)."""
    wall = {False: 0.0, True: 0.0}
    cpu = {False: 0.0, True: 0.0}
    plain_out, spec_out, stats = [], [], None
    for group in groups:
        best_wall = {False: float("inf"), True: float("inf")}
        best_cpu = {False: float("inf"), True: float("inf")}
        for rep in range(args.repeats):
            for speculative in (rep % 2 == 1, rep % 2 == 0):  # alternate which goes first
                w, c, out = timed(dec, group, speculative, args, eos)
                best_wall[speculative] = min(best_wall[speculative], w)
                best_cpu[speculative] = min(best_cpu[speculative], c)
                if rep == 0:
                    (spec_out if speculative else plain_out).extend(out.tokens)
                    if speculative:
                        stats = out.stats if stats is None else stats.merge(out.stats)
        for mode in (False, True):
            wall[mode] += best_wall[mode]
            cpu[mode] += best_cpu[mode]
    tokens = sum(len(t) for t in plain_out)
    plain_s, spec_s = wall[False], wall[True]
    speedup = plain_s / spec_s
    return {
        "tokens_per_forward": round(stats.tokens_per_forward, 3),
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / stats.tokens_per_forward, 3),
        # CPU time of this process: what wall-clock would be without other load on the cores.
        "speedup_cpu_time": round(cpu[False] / cpu[True], 3),
        "identical_to_greedy": spec_out == plain_out,
        "acceptance_rate": [round(r, 3) for r in stats.acceptance_rate],
        "accepted_drafts_per_position": stats.accepted_drafts_per_position,
        "verified_drafts_per_position": stats.verified[1:],
        "mixed_steps": stats.mixed_steps,
        "tokens": tokens,
        "drafts_at_end": stats.drafts_at_end,
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "speculative_tokens_per_s": round(tokens / spec_s, 1),
        "outputs": plain_out,
    }


def fused_vs_modules(fused: Decoder, modules: Decoder, prompts, args, eos: int) -> dict:
    """Plain greedy at batch 1 through the fused layers (the Decoder's default) and through the
    model's own modules (what decoding ran before), alternating, best of --repeats each."""
    wall = {"fused": 0.0, "modules": 0.0}
    outs: dict[str, list] = {"fused": [], "modules": []}
    for q in prompts:
        best = {"fused": float("inf"), "modules": float("inf")}
        for rep in range(args.repeats):
            order = ("fused", "modules") if rep % 2 == 0 else ("modules", "fused")
            for name in order:
                dec = fused if name == "fused" else modules
                w, _, out = timed(dec, [q], False, args, eos)
                best[name] = min(best[name], w)
                if rep == 0:
                    outs[name].extend(out.tokens)
        for name in wall:
            wall[name] += best[name]
    tokens = sum(len(t) for t in outs["fused"])
    return {
        "fused_tokens_per_s": round(tokens / wall["fused"], 1),
        "modules_tokens_per_s": round(tokens / wall["modules"], 1),
        "speedup": round(wall["modules"] / wall["fused"], 3),
        "identical": outs["fused"] == outs["modules"],
    }


def n_draft_value(text: str) -> int | str:
    """--n-draft: a number of draft heads, or auto (mtp generate's default)."""
    return text if text == "auto" else int(text)


def measure(checkpoint: str, files: list[Path], args) -> tuple[Path, dict, tuple[dict, dict]]:
    """Every comparison on one checkpoint: (checkpoint dir, its JSON report, the raw results
    of batch 1 and of batch --batch)."""
    ckpt = resolve_checkpoint(checkpoint)
    model, tok = load_for_inference(ckpt, device=args.device)
    prompts = held_out_prompts(tok, files, args.prompts, args.prompt_tokens)
    if not prompts:
        sys.exit(
            f"speculative.py: no usable .py files in {args.files or HELD_OUT}: all {len(files)}"
            f" are shorter than {MIN_TOKENS} tokens"
        )
    dec = Decoder(model, vocab_limit=tok.vocab_size)
    compare(dec, [prompts[:2]], argparse.Namespace(**{**vars(args), "repeats": 1}), tok.eos_id)

    single = compare(dec, [[q] for q in prompts], args, tok.eos_id)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    batched = compare(dec, batches, args, tok.eos_id)
    identical = (
        single["identical_to_greedy"]
        and batched["identical_to_greedy"]
        and batched["outputs"] == single["outputs"]
    )
    for case, r in (("batch 1", single), (f"batch {args.batch}", batched)):
        print(
            f"{model.cfg.mtp_arch} {case:>8}: tokens/forward {r['tokens_per_forward']:.2f}  "
            f"speedup {r['speedup']:.2f}x  efficiency {r['efficiency']:.2f}  acceptance "
            f"{r['acceptance_rate']}  plain {r['plain_tokens_per_s']} tok/s  speculative "
            f"{r['speculative_tokens_per_s']} tok/s  identical {r['identical_to_greedy']}"
        )
    paths = fused_vs_modules(dec, Decoder(model, vocab_limit=tok.vocab_size, fused=False),
                             prompts, args, tok.eos_id)  # fmt: skip
    print(
        f"plain greedy, batch 1: fused layers {paths['fused_tokens_per_s']} tok/s, the model's "
        f"modules {paths['modules_tokens_per_s']} tok/s ({paths['speedup']:.2f}x), identical "
        f"{paths['identical']}"
    )
    sweep = {}
    if args.sweep:
        for k in range(1, model.cfg.n_future):
            sub = argparse.Namespace(**{**vars(args), "n_draft": k})
            one = compare(dec, [[q] for q in prompts], sub, tok.eos_id)
            many = compare(dec, batches, sub, tok.eos_id)
            sweep[k] = {
                "tokens_per_forward": one["tokens_per_forward"],
                "speedup": one["speedup"],
                "batched_speedup": many["speedup"],
                "identical_to_greedy": one["outputs"] == single["outputs"]
                and many["outputs"] == single["outputs"],
            }
            print(
                f"n_draft {k}: batch 1 tokens/forward {one['tokens_per_forward']:.2f} speedup "
                f"{one['speedup']:.2f}x; batch {args.batch} speedup {many['speedup']:.2f}x; "
                f"identical {sweep[k]['identical_to_greedy']}"
            )
    for r in (single, batched):
        del r["outputs"]
    cfg = model.cfg
    report = {
        "tokens_per_forward": single["tokens_per_forward"],
        "speedup": single["speedup"],
        "efficiency": single["efficiency"],
        "identical_to_greedy": identical,
        "acceptance_rate": single["acceptance_rate"],
        "batched": {"batch_size": args.batch, **batched},
        "single": single,
        "plain_fused_vs_modules": paths,
        "by_n_draft": sweep,
        "checkpoint": str(ckpt),
        "model": {
            "n_future": cfg.n_future,
            "trunk_layers": cfg.trunk_layers,
            "d_model": cfg.d_model,
            "vocab_size": cfg.vocab_size,
            "family": cfg.mtp_arch,
        },
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "n_draft": args.n_draft,
        "drafts_at_end": single["drafts_at_end"],
        "threads": args.threads,
        "device": args.device,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    return ckpt, report, (single, batched)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/tiny-cpu", help="run or checkpoint directory")
    p.add_argument(
        "--chain-checkpoint",
        default=None,
        help="a second run or checkpoint (normally model.mtp_arch=chained) measured in the same "
        "run: JSON key chained",
    )
    p.add_argument(
        "--files",
        default=None,
        help="directory of held-out files: every .py under it (default: CPython's test_*.py)",
    )
    p.add_argument("--prompts", type=int, default=16, help="number of prompts")
    p.add_argument("--prompt-tokens", type=int, default=128, help="longest prompt (tokens)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched case")
    p.add_argument(
        "--n-draft",
        type=n_draft_value,
        default="auto",
        help="draft heads: a number or auto (default, as mtp generate: all, dropping the last "
        "while rarely accepted)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also every draft count 1..n-1 at batch 1 and batch --batch (JSON by_n_draft)",
    )
    p.add_argument(
        "--no-mlflow", action="store_true", help="do not add the results to the training run"
    )
    p.add_argument("--repeats", type=int, default=3, help="timings per case (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    if args.prompt_tokens < MIN_TOKENS:
        p.error(f"--prompt-tokens must be at least {MIN_TOKENS}")
    files = held_out_files(args.files)  # before the model loads: a wrong DIR fails at once

    torch.set_num_threads(args.threads)
    ckpt, report, raw = measure(args.checkpoint, files, args)
    if args.chain_checkpoint:
        report["chained"] = measure(args.chain_checkpoint, files, args)[1]
    single, batched = raw
    if not args.no_mlflow:
        metrics = {
            "decode/tokens_per_forward": single["tokens_per_forward"],
            "decode/speedup_batch1": single["speedup"],
            f"decode/speedup_batch{args.batch}": batched["speedup"],
            "decode/plain_tokens_per_s_batch1": single["plain_tokens_per_s"],
        }
        if log_to_training_run(ckpt, metrics, {"decode.n_draft": str(report["n_draft"])}):
            print("mlflow: decode/* metrics added to the training run", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
