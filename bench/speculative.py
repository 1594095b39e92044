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

On this machine (--machine): plain greedy tokens/s through the eager and the compiled step
(compiled.py), in fp32 and bf16, batch 1 and --batch, interleaved; in bf16, speculative
(every draft) against plain greedy prompt by prompt, each mismatch with the top-2 logit gap of
plain greedy's model at the first diverging token, and n_draft=auto's speedups at batch 1 and
--batch; and a bandwidth-bound shape (--big-d, --big-vocab: >= 300 MB of random weights): its
measured step cost per block width in fp32 and bf16 and the speedup those costs give with the
match rates measured on the trained checkpoint (JSON key "machine_study").

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
from mtp_dist.inference.auto import measure_step_costs
from mtp_dist.inference.precision import cast_parameters, native_bf16
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
    for g, group in enumerate(groups):
        best_wall = {False: float("inf"), True: float("inf")}
        best_cpu = {False: float("inf"), True: float("inf")}
        for rep in range(args.repeats):
            # Alternate which goes first, per repeat and per group: with an odd --repeats the
            # mode going second more often ran 2.6% slower here (plain against itself, 0.974).
            first = (g + rep) % 2 == 1
            for speculative in (first, not first):
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


def plain_paths(decoders: dict[str, Decoder], groups, args, eos: int) -> dict:
    """Plain greedy tokens/s of each decoder over prompt groups, interleaved (the order
    rotating), best of --repeats per group; outputs of the first repeat."""
    wall = dict.fromkeys(decoders, 0.0)
    outs: dict[str, list] = {name: [] for name in decoders}
    names = list(decoders)
    for dec in decoders.values():  # untimed: a compiled step compiles once more for a batch > 1
        timed(dec, groups[0], False, argparse.Namespace(**{**vars(args), "max_tokens": 4}), eos)
    for g, group in enumerate(groups):
        best = dict.fromkeys(decoders, float("inf"))
        for rep in range(args.repeats):
            shift = (g + rep) % len(names)
            for name in names[shift:] + names[:shift]:
                w, _, out = timed(decoders[name], group, False, args, eos)
                best[name] = min(best[name], w)
                if rep == 0:
                    outs[name].extend(out.tokens)
        for name in decoders:
            wall[name] += best[name]
    tokens = sum(len(t) for t in outs[names[0]])
    pairs = [(n, n.replace("_compiled", "_eager")) for n in names if n.endswith("_compiled")]
    return {
        "tokens_per_s": {n: round(tokens / wall[n], 1) for n in names},
        "identical_to": {n: outs[n] == outs[names[0]] for n in names[1:]},
        "reference": names[0],
        "compiled_identical_to_eager": {c: outs[c] == outs[e] for c, e in pairs if e in outs},
    }


def bf16_identity(model, dec: Decoder, prompts, args, eos: int) -> dict:
    """bf16 speculative (every draft) vs bf16 plain greedy, prompt by prompt: the fraction
    identical, and for each mismatch the first diverging index and the top-2 gap of the
    model's own bf16 logits there (plain greedy's prefix)."""
    n = model.cfg.n_future - 1
    mismatches = []
    for i, q in enumerate(prompts):
        plain = timed(dec, [q], False, args, eos)[2].tokens[0]
        spec = dec.run([q], max_new_tokens=args.max_tokens, speculative=True, n_draft=n,
                       stoppers=[Stopper(eos_id=eos)]).tokens[0]  # fmt: skip
        if plain == spec:
            continue
        j = next(
            (k for k, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec))
        )
        with torch.inference_mode():
            logits = model.next_token_logits(torch.tensor([q + plain[:j]]))[0, -1].float()
        top = logits[: dec.vocab_limit].topk(2).values.tolist()
        mismatches.append({"prompt": i, "at_token": j, "top2_gap": round(top[0] - top[1], 4),
                           "top2": [round(x, 4) for x in top]})  # fmt: skip
    return {
        "prompts": len(prompts),
        "identical_fraction": round(1 - len(mismatches) / len(prompts), 4),
        "mismatches": mismatches,
    }


def big_shape(model, tok, rates: list[float], args) -> dict:
    """A bandwidth-bound shape with random weights: step cost per width (measured, fp32 and
    bf16, batch 1 and --batch) and the speedup those costs give at the trained model's
    measured match rates `rates` (r_1..r_{n-1}) at the best width."""
    from mtp_dist.config import ModelConfig
    from mtp_dist.model import MTPModel

    cfg = model.cfg
    big_cfg = ModelConfig(
        vocab_size=args.big_vocab, d_model=args.big_d, n_layers=cfg.n_layers,
        n_attn_heads=args.big_d // 64, n_future=cfg.n_future, max_seq_len=512,
        mtp_arch=cfg.mtp_arch,
    )  # fmt: skip
    torch.manual_seed(0)
    big = MTPModel(big_cfg).eval()
    mb = sum(p.numel() * 4 for p in big.parameters()) / 1e6
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.big_vocab, (64,), generator=gen).tolist()
    out = {"weights_mb_fp32": round(mb), "d_model": args.big_d, "vocab": args.big_vocab,
           "match_rates_from_trained": [round(r, 4) for r in rates]}  # fmt: skip
    full = [1.0, *rates]
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        dec = Decoder(cast_parameters(big, dtype))
        for batch in (1, args.batch):
            costs = measure_step_costs(dec, [prompt] * batch, cfg.n_future)
            ratio = {w: costs.ratio(w) for w in costs.seconds}
            gain = {w: (1 + sum(full[1:w])) / ratio[w] for w in ratio}
            best = max(gain, key=gain.get)
            out[f"{name}_batch{batch}"] = {
                "plain_step_ms": round(costs.seconds[1] * 1e3, 2),
                "cost_ratio": {str(w): round(r, 3) for w, r in ratio.items()},
                "expected_speedup": round(gain[best], 3),
                "best_width": best,
            }
    return out


def machine_study(checkpoint: str, files: list[Path], args, report: dict) -> dict:
    """Eager vs compiled, fp32 vs bf16, bf16 identity, the big shape (module docstring)."""
    import copy

    ckpt = resolve_checkpoint(checkpoint)
    model, tok = load_for_inference(ckpt, device=args.device)
    prompts = held_out_prompts(tok, files, args.prompts, args.prompt_tokens)
    eos, v = tok.eos_id, tok.vocab_size
    bf16 = cast_parameters(copy.deepcopy(model), torch.bfloat16)
    decoders = {
        "fp32_eager": Decoder(model, vocab_limit=v),
        "bf16_eager": Decoder(bf16, vocab_limit=v),
    }
    compile_s = {}
    for name, m in (("fp32", model), ("bf16", bf16)):
        dec = Decoder(m, vocab_limit=v, compile=True)
        decoders[f"{name}_compiled"] = dec
        compile_s[name] = round(dec.compile_seconds, 1)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    paths = {"batch1": plain_paths(decoders, [[q] for q in prompts], args, eos),
             f"batch{args.batch}": plain_paths(decoders, batches, args, eos)}  # fmt: skip
    # The noise floor of a ratio here: one decoder against itself, timed as everything else.
    same = {"plain": decoders["fp32_eager"], "plain_again": decoders["fp32_eager"]}
    control = {}
    for case, groups in (("batch1", [[q] for q in prompts]), (f"batch{args.batch}", batches)):
        tps = plain_paths(same, groups, args, eos)["tokens_per_s"]
        control[case] = round(tps["plain_again"] / tps["plain"], 3)
    print(f"control: plain greedy against itself {control} (the noise of a ratio here)")
    for case, r in paths.items():
        print(f"plain greedy {case} tok/s: {r['tokens_per_s']} identical to fp32 eager: "
              f"{r['identical_to']}; compiled == eager: "
              f"{r['compiled_identical_to_eager']}")  # fmt: skip
    print(f"compile seconds: {compile_s}")
    dec_bf16 = decoders["bf16_eager"]
    identity = bf16_identity(bf16, dec_bf16, prompts, args, eos)
    print(f"bf16 speculative (all drafts) == bf16 greedy: {identity['identical_fraction']:.0%} of "
          f"{identity['prompts']} prompts; mismatches {identity['mismatches']}")  # fmt: skip
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    compare(dec_bf16, [prompts[:1], prompts[: args.batch]], warm, eos)  # untimed, as above
    bf16_single = compare(dec_bf16, [[q] for q in prompts], args, eos)
    bf16_batched = compare(dec_bf16, batches, args, eos)
    for case, r in (("batch 1", bf16_single), (f"batch {args.batch}", bf16_batched)):
        del r["outputs"]
        print(f"bf16 n_draft={args.n_draft} {case}: speedup {r['speedup']:.2f}x, tokens/forward "
              f"{r['tokens_per_forward']:.2f}, drafts at end {r['drafts_at_end']}")  # fmt: skip
    # Match rates r_j of the trained model (fp32, every draft, batch 1) for the big shape.
    n = model.cfg.n_future - 1
    sub = argparse.Namespace(**{**vars(args), "n_draft": n, "repeats": 1})
    stats = compare(decoders["fp32_eager"], [[q] for q in prompts], sub, eos)
    verified = stats["verified_drafts_per_position"]
    rates = [a / max(b, 1) for a, b in zip(stats["accepted_drafts_per_position"], verified)]
    big = big_shape(model, tok, rates, args)
    for key, r in big.items():
        if isinstance(r, dict):
            print(f"big shape ({big['weights_mb_fp32']} MB fp32, random weights) {key}: plain "
                  f"step {r['plain_step_ms']} ms, a block of w costs {r['cost_ratio']} steps, "
                  f"expected speedup at the trained model's match rates {r['expected_speedup']}x "
                  f"(width {r['best_width']})")  # fmt: skip
    return {
        "native_bf16": native_bf16(),
        "compile_seconds": compile_s,
        "plain_paths": paths,
        "control_plain_vs_plain": control,
        "bf16_identity": identity,
        "bf16_speculative": {"single": bf16_single, "batched": bf16_batched},
        "big_shape": big,
    }


def block_cost(args) -> dict:
    """The cost of a w-token verify step relative to a 1-token step, w = 1..8, for a model of
    --block-shape with random weights in bf16 (fp32 on a CPU): compiled.py's static step (trunk
    + head 1 + unembedding) captured in one CUDA graph per w and replayed (--device cuda; run
    eagerly on a CPU, the dry run of the plumbing); and the decoder's real steps (drafting
    included, eager) from auto.py's measure_step_costs. With them, the speedup at the paper's
    3.5 tokens per forward (n = 4, 7B: 3.05x measured there)."""
    from mtp_dist.config import ModelConfig
    from mtp_dist.inference.compiled import StaticStep
    from mtp_dist.model import MTPModel

    d, layers, ffn, vocab = (int(x) for x in args.block_shape.split(","))
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_attn_heads=max(d // 128, 1),
                      ffn_hidden=ffn, n_future=4, max_seq_len=1024)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        model = MTPModel(cfg).eval()
    cast_parameters(model, dtype)
    dec = Decoder(model)
    static = StaticStep(dec)
    keys, values = static.new_caches(1)
    ms = {}
    with torch.inference_mode():
        for w in range(1, 9):
            ids = torch.zeros(1, w, dtype=torch.long, device=dev)
            pos = (torch.arange(w, device=dev) + 512)[None]
            last = torch.full((1,), w - 1, device=dev)
            run = lambda i=ids, p=pos, t=last: static.forward(i, p, keys, values, t)  # noqa: E731
            if dev.type == "cuda":
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                run = graph.replay
            best = float("inf")
            for _ in range(5):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    run()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - start) / 10)
            ms[w] = best * 1e3
    costs = measure_step_costs(dec, [list(range(1, 65))], 4)
    ratio = {w: ms[w] / ms[1] for w in ms}
    report = {
        "shape": {"d_model": d, "layers": layers, "ffn": ffn, "vocab": vocab},
        "weights_gb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2),
        "dtype": str(dtype).removeprefix("torch."),
        "cuda_graphs": dev.type == "cuda",
        "verify_step_ms": {str(w): round(t, 3) for w, t in ms.items()},
        "verify_cost_ratio": {str(w): round(r, 3) for w, r in ratio.items()},
        "decoder_step_cost_ratio": costs.as_dict(),
        "expected_speedup_at_3.5_tokens_per_forward": {
            "verify_only": round(3.5 / ratio[4], 3),
            "with_drafting_eager": round(3.5 / costs.ratio(4), 3),
            "paper": 3.05,
        },
    }
    print(f"block cost ({report['weights_gb']} GB {report['dtype']}, random weights): "
          f"w-token verify step / 1-token step {report['verify_cost_ratio']}; decoder steps "
          f"(drafting included) {report['decoder_step_cost_ratio']}; expected speedup at 3.5 "
          f"tokens/forward {report['expected_speedup_at_3.5_tokens_per_forward']}")  # fmt: skip
    return report


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
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    # Untimed: first calls allocate, and n_draft=auto measures step costs once per batch size.
    compare(dec, [prompts[:1], prompts[: args.batch]], warm, tok.eos_id)

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
        help="draft heads: a number or auto (default, as mtp generate: as many as pay by the "
        "measured step costs and acceptance, possibly none)",
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
    p.add_argument(
        "--machine",
        action="store_true",
        help="also eager vs compiled, fp32 vs bf16, bf16 identity, a bandwidth-bound shape",
    )
    p.add_argument(
        "--block-cost",
        action="store_true",
        help="only the cost of a w-token step vs a 1-token step (w = 1..8) of --block-shape, "
        "random weights, CUDA graphs on --device cuda (JSON key block_cost)",
    )
    p.add_argument(
        "--block-shape",
        default="4096,32,11008,32000",
        help="d_model,layers,ffn,vocab of --block-cost (default: 7B-shaped)",
    )
    p.add_argument("--big-d", type=int, default=1024, help="--machine's big shape: d_model")
    p.add_argument("--big-vocab", type=int, default=32768, help="--machine's big shape: vocab")
    args = p.parse_args()
    if args.prompt_tokens < MIN_TOKENS:
        p.error(f"--prompt-tokens must be at least {MIN_TOKENS}")
    if args.block_cost:
        torch.set_num_threads(args.threads)
        print(json.dumps({"block_cost": block_cost(args)}))
        return
    files = held_out_files(args.files)  # before the model loads: a wrong DIR fails at once

    torch.set_num_threads(args.threads)
    ckpt, report, raw = measure(args.checkpoint, files, args)
    if args.machine:
        report["machine_study"] = machine_study(args.checkpoint, files, args, report)
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
