"""Decoding speed against transformers, same weights, same prompts, one run.

    python bench/interop_speed.py                          # trains the default recipe (short)
    python bench/interop_speed.py --checkpoint runs/tiny-cpu --assistant RUN

The model is exported with `mtp export hf` (mtp_dist/checkpoint/hf.py) into a temporary
directory and loaded by transformers' `LlamaForCausalLM`, so both sides run the same next-token
weights. Modes, each on the same held-out prompts (the openings of CPython's test_*.py files,
as bench/speculative.py picks them: code the stdlib training corpus leaves out):

    mtp_greedy        our Decoder, plain greedy (the reference every output is compared with)
    mtp_greedy_compiled  with --compile: our Decoder's compiled plain step (compiled.py)
    mtp_speculative   our Decoder, self-speculative (--n-draft: `mtp generate`'s default, auto)
    hf_greedy         transformers `generate(do_sample=False)`
    hf_prompt_lookup  `generate(prompt_lookup_num_tokens=K)`: drafts copied from the prompt
    hf_assisted       `generate(assistant_model=...)`: a smaller next-token model with the same
                      tokenizer drafts (trained here unless --assistant is given)

at batch 1 (each prompt alone) and batch --batch (one left-padded batch for transformers; our
Decoder takes ragged prompts). transformers 5.24 refuses its assisted modes above batch 1; the
bench asks it anyway and shows its refusal in the table. Modes alternate order per prompt and
the best of --repeats timings is kept, so load from other processes hits every mode alike; the
load average is recorded. Without --checkpoint, configs/tiny-cpu.yaml (the default recipe) is
trained for --train-steps in a temporary run directory. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speculative import held_out_files, held_out_prompts, n_draft_value

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny-cpu.yaml"
FIXED = ["tracking.enabled=false", "train.eval_every=0", "train.log_every=50"]
# A next-token model four times narrower and with a quarter of the layers: cheap enough per
# forward for drafting to pay, if anything can.
ASSISTANT = ["model.d_model=64", "model.n_attn_heads=2", "model.n_layers=2", "model.n_future=1"]
MTP_MODES = ("mtp_greedy", "mtp_greedy_compiled", "mtp_speculative")
HF_MODES = ("hf_greedy", "hf_prompt_lookup", "hf_assisted")

Mode = Callable[[list[list[int]], int], list[list[int]]]
"""(prompts, max_new_tokens) -> new tokens per prompt, up to (not including) EOS."""


def fail(message: str) -> None:
    print(f"interop_speed: {message}", file=sys.stderr)
    sys.exit(2)


def train(run_dir: Path, steps: int, overrides: list[str]) -> Path:
    """Train the default recipe with `overrides` (subprocess: `mtp train`); returns run_dir."""
    cmd = [sys.executable, "-m", "mtp_dist.cli", "train", str(RECIPE), *FIXED, *overrides,
           f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
           f"train.warmup_steps={max(1, min(20, steps // 10))}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"training {run_dir.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    print(f"trained {run_dir.name}: {steps} steps in {time.perf_counter() - start:.0f} s")
    return run_dir


def until_eos(ids: list[int], eos: int) -> list[int]:
    """What our Decoder returns for the same stream: the tokens before the first EOS."""
    return ids[: ids.index(eos)] if eos in ids else ids


def mtp_mode(dec, eos: int, n_draft=None) -> Mode:
    """Our Decoder: plain greedy, or self-speculative with `n_draft` drafts when given."""
    from mtp_dist.inference import Stopper

    spec = {} if n_draft is None else {"speculative": True, "n_draft": n_draft}

    def run(prompts, max_new):
        stoppers = [Stopper(eos_id=eos) for _ in prompts]
        return dec.run(prompts, max_new_tokens=max_new, stoppers=stoppers, **spec).tokens

    return run


def hf_mode(model, eos: int, pad: int, **kwargs) -> Mode:
    """transformers' generate on left-padded prompts with their attention mask (greedy)."""

    @torch.inference_mode()
    def run(prompts, max_new):
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, T - len(p) :] = torch.tensor(p)
            mask[b, T - len(p) :] = 1
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
            eos_token_id=eos, pad_token_id=pad, **kwargs,
        )  # fmt: skip
        return [until_eos(row, eos) for row in out[:, T:].tolist()]

    return run


def measure(modes: dict[str, Mode], groups: list[list[list[int]]], repeats: int, max_new: int):
    """Per mode: tokens/s (sum over groups of the best of `repeats` timings, wall clock and this
    process's CPU time), the outputs of the first repeat, or the error transformers raised
    (ValueError: a mode it refuses)."""
    wall, cpu = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0.0)
    outputs: dict[str, list] = {name: [] for name in modes}
    errors: dict[str, str] = {}
    names = list(modes)
    for g, group in enumerate(groups):
        best = {name: [float("inf"), float("inf")] for name in modes}
        for rep in range(repeats):
            shift = (g + rep) % len(names)  # rotate which mode goes first
            for name in names[shift:] + names[:shift]:
                if name in errors:
                    continue
                start, start_cpu = time.perf_counter(), time.process_time()
                try:
                    out = modes[name](group, max_new)
                except ValueError as err:
                    errors[name] = str(err).splitlines()[0]
                    continue
                best[name][0] = min(best[name][0], time.perf_counter() - start)
                best[name][1] = min(best[name][1], time.process_time() - start_cpu)
                if rep == 0:
                    outputs[name].extend(out)
        for name in modes:
            wall[name] += best[name][0]
            cpu[name] += best[name][1]
    report = {}
    for name in modes:
        tokens = sum(len(t) for t in outputs[name])
        if name in errors:
            report[name] = {"error": errors[name]}
        else:
            report[name] = {
                "tokens": tokens,
                "tokens_per_s": round(tokens / wall[name], 1),
                # CPU time of both threads: less disturbed by other processes than wall time
                # (a thread waiting for a core is not charged), but it counts spin-waiting.
                "tokens_per_cpu_s": round(tokens / cpu[name], 1),
            }
        report[name]["outputs"] = outputs[name]
    return report


def summarise(case: dict, reference: list) -> dict:
    """Flat results of one batch size: tokens/s, identity with our greedy, the two ratios."""
    flat, tps = {}, {}
    for name, r in case.items():
        if "error" in r:
            flat[f"{name}_tokens_per_s"] = flat[f"{name}_tokens_per_cpu_s"] = None
            flat[f"{name}_error"] = r["error"]
            continue
        tps[name] = flat[f"{name}_tokens_per_s"] = r["tokens_per_s"]
        flat[f"{name}_tokens_per_cpu_s"] = r["tokens_per_cpu_s"]
        if name != "mtp_greedy":  # the reference itself
            flat[f"{name}_identical_to_greedy"] = r["outputs"] == reference
    for suffix, key in (("", "tokens_per_s"), ("_cpu", "tokens_per_cpu_s")):
        rate = {n: case[n][key] for n in tps}
        best_hf = max((rate[n], n) for n in HF_MODES if n in rate)
        flat[f"ratio_mtp_greedy_vs_hf_greedy{suffix}"] = round(
            rate["mtp_greedy"] / rate["hf_greedy"], 3
        )
        flat[f"ratio_mtp_speculative_vs_best_hf{suffix}"] = round(
            rate["mtp_speculative"] / best_hf[0], 3
        )
        flat[f"best_hf_mode{suffix}"] = best_hf[1]
    return flat


def print_table(cases: dict[str, dict]) -> None:
    print("\n| mode | " + " | ".join(f"{c} tok/s | tok/CPU-s | identical" for c in cases) + " |")
    print("|---|" + "---:|---:|---|" * len(cases))
    for name in MTP_MODES + HF_MODES:
        if all(f"{name}_tokens_per_s" not in flat for flat in cases.values()):
            continue  # not run (no assistant)
        cells = []
        for flat in cases.values():
            if flat.get(f"{name}_error"):
                cells += [f"n/a: {flat[f'{name}_error']}", "", ""]
                continue
            same = flat.get(f"{name}_identical_to_greedy")
            cells += [f"{flat[f'{name}_tokens_per_s']}", f"{flat[f'{name}_tokens_per_cpu_s']}",
                      "reference" if same is None else ("yes" if same else "no")]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    for case, flat in cases.items():
        print(
            f"{case}: mtp greedy / hf greedy {flat['ratio_mtp_greedy_vs_hf_greedy']:.2f}x, "
            f"mtp speculative / best hf ({flat['best_hf_mode']}) "
            f"{flat['ratio_mtp_speculative_vs_best_hf']:.2f}x (by CPU time: "
            f"{flat['ratio_mtp_greedy_vs_hf_greedy_cpu']:.2f}x, "
            f"{flat['ratio_mtp_speculative_vs_best_hf_cpu']:.2f}x vs {flat['best_hf_mode_cpu']})"
        )


def load_models(args, work: Path):
    """(our model, tokenizer, hf model, hf assistant or None, checkpoint paths)."""
    import transformers

    from mtp_dist.checkpoint import CheckpointError, load_for_inference, resolve_checkpoint
    from mtp_dist.checkpoint.hf import export_hf

    transformers.logging.set_verbosity_error()  # generate's per-call notices, not errors
    transformers.logging.disable_progress_bar()
    try:
        main_run = args.checkpoint or train(work / "model", args.train_steps, [])
        ckpt = resolve_checkpoint(main_run)
        model, tok = load_for_inference(ckpt)
        assistant = None
        if args.assistant or args.assistant_steps:
            tok_dir = f"data.tokenizer_path={ckpt / 'tokenizer'}"
            assistant = args.assistant or train(
                work / "assistant", args.assistant_steps, [*ASSISTANT, tok_dir]
            )
            assistant = resolve_checkpoint(assistant)
            if load_for_inference(assistant)[1].identity() != tok.identity():
                fail(f"--assistant {args.assistant}: its tokenizer is not the model's")
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf = load(export_hf(ckpt, work / "hf")).eval()
    hf_assistant = None if assistant is None else load(export_hf(assistant, work / "hf_a")).eval()
    return model, tok, hf, hf_assistant, {"model": str(ckpt), "assistant": str(assistant)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="run or checkpoint (default: train the default recipe)")
    p.add_argument("--train-steps", type=int, default=150, help="steps without --checkpoint")
    p.add_argument("--assistant", help="run or checkpoint of hf_assisted's draft model")
    p.add_argument(
        "--assistant-steps", type=int, default=300, help="steps of the trained assistant (0: none)"
    )
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    p.add_argument("--prompt-tokens", type=int, default=128, help="longest prompt (tokens)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--batch", type=int, default=8, help="the batched case's batch size")
    p.add_argument(
        "--n-draft",
        type=n_draft_value,
        default="auto",
        help="mtp_speculative's draft heads: a number or auto (mtp generate's default)",
    )
    p.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--repeats", type=int, default=2, help="timings per case (best is kept)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (both sides)")
    p.add_argument(
        "--compile", action="store_true", help="also our compiled plain step (mtp_greedy_compiled)"
    )
    args = p.parse_args()
    if args.batch < 2:
        p.error("--batch must be at least 2 (batch 1 is always measured)")
    files = held_out_files(None)
    torch.set_num_threads(args.threads)
    load_before, began = os.getloadavg(), time.perf_counter()

    from mtp_dist.eval.heldout_cli import cpu_name
    from mtp_dist.inference import Decoder

    with tempfile.TemporaryDirectory(prefix="interop_speed_") as tmp:
        model, tok, hf, hf_assistant, paths = load_models(args, Path(tmp))
        prompts = held_out_prompts(tok, files, args.prompts, args.prompt_tokens)
        dec = Decoder(model, vocab_limit=tok.vocab_size)
        eos, pad, n = tok.eos_id, tok.pad_id, args.max_tokens
        modes = {
            "mtp_greedy": mtp_mode(dec, eos),
            "mtp_speculative": mtp_mode(dec, eos, n_draft=args.n_draft),
            "hf_greedy": hf_mode(hf, eos, pad),
            "hf_prompt_lookup": hf_mode(hf, eos, pad, prompt_lookup_num_tokens=args.lookup_tokens),
        }
        if args.compile:
            compiled = Decoder(model, vocab_limit=tok.vocab_size, compile=True)
            modes["mtp_greedy_compiled"] = mtp_mode(compiled, eos)
        if hf_assistant is not None:
            modes["hf_assisted"] = hf_mode(hf, eos, pad, assistant_model=hf_assistant)
        # Warm-up: first calls allocate; n_draft=auto measures step costs and a compiled step
        # recompiles once, per batch size.
        measure(modes, [prompts[:1], prompts[: args.batch]], 1, 16)
        start = time.perf_counter()
        setup = start - began  # training, export, loading, warm-up
        batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
        raw = {
            "batch1": measure(modes, [[q] for q in prompts], args.repeats, n),
            f"batch{args.batch}": measure(modes, batches, args.repeats, n),
        }
        seconds = time.perf_counter() - start
    cases = {c: summarise(r, r["mtp_greedy"]["outputs"]) for c, r in raw.items()}
    batched = f"batch{args.batch}"
    same_batched = raw[batched]["mtp_greedy"]["outputs"] == raw["batch1"]["mtp_greedy"]["outputs"]
    print_table(cases)
    identical = {
        f"{c}.{k.removesuffix('_identical_to_greedy')}": v
        for c, flat in cases.items()
        for k, v in flat.items()
        if k.endswith("_identical_to_greedy")
    }
    identical[f"{batched}.mtp_greedy_vs_batch1"] = same_batched
    report = {f"{c}.{k}": v for c, flat in cases.items() for k, v in flat.items()}
    report.update(
        identical_to_greedy=identical,
        goal_greedy_at_least_hf_greedy=all(
            f["ratio_mtp_greedy_vs_hf_greedy"] >= 1 for f in cases.values()
        ),
        goal_speculative_ahead_of_every_hf_mode=all(
            f["ratio_mtp_speculative_vs_best_hf"] > 1 for f in cases.values()
        ),
        prompts=len(prompts),
        max_tokens=n,
        n_draft=args.n_draft,
        lookup_tokens=args.lookup_tokens,
        compile_seconds=round(compiled.compile_seconds, 1) if args.compile else None,
        repeats=args.repeats,
        threads=args.threads,
        setup_seconds=round(setup, 1),
        decode_seconds=round(seconds, 1),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        checkpoints=paths,
        n_future=model.cfg.n_future,
        machine=f"{platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs",
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
