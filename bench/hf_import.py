"""Peak memory of `mtp import hf` on a sharded bf16 Llama checkpoint (docs/interop.md, Memory).

    python bench/hf_import.py [--layers 12] [--d-model 2048] [--vocab 32000] [--n-future 1 4]

Writes a random Llama checkpoint in transformers' layout (config.json, bf16 safetensors shards
of at most 400 MB with model.safetensors.index.json, and a small byte-level BPE tokenizer), then
imports it in a fresh process per --n-future value while a thread samples the process's
/proc/self/status: anonymous memory (RssAnon: the tensors the import itself allocates) and
file-backed memory (RssFile: pages of the memory-mapped shards, the page cache, which the
kernel can drop). Prints a table, then one JSON object; the ratios are to the checkpoint's
weight bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SAMPLER = r"""
import re, sys, threading, time, json
peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
def sample():
    while True:
        text = open("/proc/self/status").read()
        for key in peak:
            peak[key] = max(peak[key], int(re.search(key + r":\s+(\d+)", text).group(1)))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
import torch, safetensors, mtp_dist.checkpoint.hf_import as imp, mtp_dist.tokenizers.pretrained
time.sleep(0.1)
base = dict(peak)
start = time.perf_counter()
imp.import_hf(sys.argv[1], sys.argv[2], n_future=int(sys.argv[3]))
seconds = time.perf_counter() - start
time.sleep(0.1)
print(json.dumps({"base": base, "peak": peak, "seconds": seconds}))
"""


def write_checkpoint(out: Path, layers: int, d: int, vocab_hint: int) -> int:
    """A random bf16 Llama in transformers' sharded layout; returns its weight bytes."""
    import torch
    import transformers
    from hf_checkpoints import byte_bpe_tokenizer, tokenizer_size
    from safetensors.torch import save_file

    byte_bpe_tokenizer(out)
    vocab = max(vocab_hint, tokenizer_size(out))
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=int(d * 8 / 3) // 256 * 256,
        num_hidden_layers=layers,
        num_attention_heads=d // 64,
        num_key_value_heads=d // 256,
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]  # what a model's save_pretrained records
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    shards, current, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        current[name] = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        size += current[name].numel() * 2
        if size > 400e6:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * 2 for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--n-future", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        weights = write_checkpoint(src, args.layers, args.d_model, args.vocab)
        rows = []
        for n in args.n_future:
            run = Path(tmp) / f"run{n}"
            out = subprocess.run(
                [sys.executable, "-c", SAMPLER, str(src), str(run), str(n)],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"import failed:\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            mib = lambda key, g=got: (g["peak"][key] - g["base"][key]) / 1024  # noqa: E731
            rows.append(
                {
                    "n_future": n,
                    "anon_mib": round(mib("RssAnon"), 1),
                    "file_mib": round(mib("RssFile"), 1),
                    "anon_ratio": round(mib("RssAnon") * 2**20 / weights, 3),
                    "seconds": round(got["seconds"], 1),
                }
            )
            time.sleep(0.5)
    print(f"checkpoint: {args.layers} layers, d {args.d_model}, {weights / 2**20:.0f} MiB bf16")
    print(f"{'n_future':>8} {'+anon MiB':>10} {'+file MiB':>10} {'anon/weights':>13} {'s':>6}")
    for r in rows:
        print(
            f"{r['n_future']:>8} {r['anon_mib']:>10} {r['file_mib']:>10} "
            f"{r['anon_ratio']:>13} {r['seconds']:>6}"
        )
    print(json.dumps({"weights_mib": round(weights / 2**20, 1), "runs": rows}))


if __name__ == "__main__":
    main()
