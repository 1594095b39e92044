"""Training tokens/s of n=1 vs n=4 parameter-matched models, side by side in one process.

    python bench/throughput.py [--steps 12 --warmup 3 --vocab 4096 --d-model 256 --layers 6]

Both models have the same total layers (n=4 moves 3 trunk layers into heads), run the same batches,
and their steps are interleaved (n1, n4, n1, n4, ...) so machine noise hits both alike. Model FLOPs
per token count every matmul of forward + backward (3x forward): trunk and head layers
(projections and attention scores) and one unembedding per head. The implementation adds nothing
beyond the arithmetic when ratio_step_time_n4_vs_n1 <= 1.05 * ratio_flops_n4_vs_n1.
With transformers installed, its `LlamaForCausalLM` of the n = 1 shape (same width, layers,
heads, FFN, vocabulary; SDPA attention; the same AdamW step) runs interleaved with them: the peer
a next-token step is compared with (`ratio_n1_vs_transformers_tokens_per_s`).
Prints a table, then one JSON object (last line).

`--device cuda` runs the same on the GPU (synchronised timing); `--bf16` adds bf16 autocast there,
as the trainer does on GPU. A larger model (e.g. `--d-model 1024 --layers 12 --vocab 32000
--seq 2048`) is what a GPU needs to be busy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtp_dist.config import ModelConfig
from mtp_dist.model import MTPModel, split_window


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward; forward = 2 x multiply-adds."""
    d, f, V = cfg.d_model, cfg.ffn_width, cfg.vocab_size
    layers = cfg.trunk_layers + cfg.n_future  # every head is a full transformer layer
    per_layer = (
        4 * d * d + 3 * d * f + 2 * seq_len * d
    )  # projections + QK^T and AV (full, not causal)
    forward = 2 * (layers * per_layer + cfg.n_future * d * V)
    return 3.0 * forward


def transformers_llama(cfg: ModelConfig, device: torch.device):
    """transformers' LlamaForCausalLM of the next-token model's shape, or None without it."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_width,
        num_hidden_layers=cfg.trunk_layers + 1,
        num_attention_heads=cfg.n_attn_heads,
        num_key_value_heads=cfg.n_attn_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    models, opts, cfgs = {}, {}, {}
    for n in (1, 4):
        torch.manual_seed(0)
        cfgs[n] = ModelConfig(
            vocab_size=args.vocab,
            d_model=args.d_model,
            n_layers=args.layers,
            n_attn_heads=max(1, args.d_model // 64),
            n_future=n,
            max_seq_len=args.seq,
            loss_impl="sequential",
        )
        models[n] = MTPModel(cfgs[n]).to(device)
        opts[n] = torch.optim.AdamW(models[n].parameters(), lr=1e-4)
    peer = transformers_llama(cfgs[1], device)
    if peer is not None:
        models["hf"], opts["hf"] = peer, torch.optim.AdamW(peer.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 4), generator=g).to(device)
        for _ in range(4)
    ]

    def step(n: int, k: int) -> float:
        inputs, labels = split_window(batches[k % len(batches)], args.seq)
        sync()
        start = time.perf_counter()
        opts[n].zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if n == "hf":  # next-token loss on the same tokens, float32 as ours
                logits = models[n](input_ids=inputs).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels[:, : args.seq].reshape(-1)
                )
            else:
                loss = models[n](inputs, labels).loss
        loss.backward()
        opts[n].step()
        sync()
        return time.perf_counter() - start

    names = [n for n in (1, 4, "hf") if n in models]
    times: dict = {n: [] for n in names}
    for k in range(args.warmup + args.steps):
        for n in names:
            t = step(n, k)
            if k >= args.warmup:
                times[n].append(t)

    tokens = args.batch * args.seq
    rows = {}
    for n in names:
        median = statistics.median(times[n])
        rows[n] = {
            "step_s": round(median, 4),
            "tokens_per_s": round(tokens / median, 1),
            "flops_per_token": flops_per_token(cfgs[1 if n == "hf" else n], args.seq),
            "params": sum(p.numel() for p in models[n].parameters()),
        }
    print(f"{'model':<8}{'step s':>10}{'tok/s':>10}{'GFLOP/tok':>12}{'params':>12}")
    for n, r in rows.items():
        gf = r["flops_per_token"] / 1e9
        label = "hf n=1" if n == "hf" else f"n={n}"
        print(
            f"{label:<8}{r['step_s']:>10.4f}{r['tokens_per_s']:>10.0f}{gf:>12.4f}{r['params']:>12,}"
        )
    ratio_time = rows[4]["step_s"] / rows[1]["step_s"]
    ratio_flops = rows[4]["flops_per_token"] / rows[1]["flops_per_token"]
    summary = {
        "config": vars(args),
        "n1": rows[1],
        "n4": rows[4],
        "ratio_step_time_n4_vs_n1": round(ratio_time, 3),
        "ratio_flops_n4_vs_n1": round(ratio_flops, 3),
        "overhead_vs_arithmetic": round(ratio_time / ratio_flops, 3),
    }
    if "hf" in rows:
        summary["transformers_n1"] = rows["hf"]
        summary["ratio_n1_vs_transformers_tokens_per_s"] = round(
            rows[1]["tokens_per_s"] / rows["hf"]["tokens_per_s"], 3
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
