"""vLLM as an independent engine for chained exports (`model.mtp_arch=chained` -> `mtp export hf`,
GLM-4.5 layout): its greedy tokens, its MTP speculative decoding and its OpenAI server against
our decoder, on one trained toy model. docs/interop.md, section "vLLM".

vLLM's CPU build lives in a venv of its own (scripts/vllm_venv.sh; it pins transformers < 5.20),
so it runs here only through scripts/vllm_check.py in a subprocess. The `vllm_env` fixture makes
the venv when it is missing (a few minutes, ~3.5 GB; reused afterwards): the tier is never
skipped. MTP_VLLM_VENV names a venv kept elsewhere (a CI cache). Select the tier with
`pytest -m vllm`, leave it out with `-m "not vllm"`.

What is compared, all greedy in float32 on the same prompt ids ([EOS] + the prompt's tokens, as
`Generator.encode` makes them):
- vLLM plain greedy == vLLM MTP speculative (k = 1 and 2) == our Decoder, token for token;
- with k = 1 its spec-decode counters equal our per-position acceptance (the counting
  conventions differ at the end of a request: see `test_k1_counters_equal_our_acceptance`);
- the text vLLM's server returns over HTTP == `mtp generate`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_models import letter_runs, save_checkpoint, train_toy_model

from mtp_dist.cli import main
from mtp_dist.inference import Decoder
from mtp_dist.tokenizers.byte import ByteTokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["abcdef\nmnop", "uvw\nghijk", "qrstuv"]
MAX_TOKENS = 24
KS = (1, 2)
CHECK_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """The venv's python: MTP_VLLM_VENV's, or scripts/vllm_venv.sh's (built when missing)."""
    venv = os.environ.get("MTP_VLLM_VENV")
    if venv:
        python = Path(venv) / "bin" / "python"
        if subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode:
            pytest.fail(
                f"MTP_VLLM_VENV={venv} has no python importing vllm: "
                f"make it with scripts/vllm_venv.sh {venv}"
            )
        return str(python)
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vllm_venv.sh")], capture_output=True, text=True
    )
    if made.returncode:
        pytest.fail(f"scripts/vllm_venv.sh failed:\n{made.stderr[-3000:]}")
    return str(Path(made.stdout.strip()) / "bin" / "python")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A chained model with two modules (n_future 3) trained on letter runs, where drafts are
    right inside a run and wrong across line breaks; exported with `mtp export hf`.
    n_attn_heads 2 at d_model 64: head width 32 (vLLM's CPU attention takes 32, 64, 80, ...,
    not 16)."""
    torch.set_num_threads(1)
    tok = ByteTokenizer()
    model = train_toy_model(
        tok, letter_runs(40, seed=0), n_future=3, mtp_arch="chained", n_attn_heads=2, steps=150
    )
    root = tmp_path_factory.mktemp("vllm")
    ckpt = save_checkpoint(model, tok, root / "run")
    out = root / "glm"
    assert main(["export", "hf", str(ckpt), str(out)]) == 0
    prompts = [[tok.eos_id] + tok.encode(p) for p in PROMPTS]
    return model, tok, ckpt, out, prompts


@pytest.fixture(scope="module")
def vllm(vllm_python, exported):
    """scripts/vllm_check.py's JSON for the export: plain, MTP with k = 1 and 2, served."""
    _, _, _, out, prompts = exported
    cmd = [vllm_python, str(ROOT / "scripts" / "vllm_check.py"), str(out)]
    cmd += ["--prompt-ids", json.dumps(prompts), "--max-tokens", str(MAX_TOKENS)]
    cmd += ["--k", ",".join(map(str, KS)), "--modes", "plain,mtp,serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CHECK_TIMEOUT_S)
    if done.returncode:
        pytest.fail(f"vllm_check.py failed ({done.returncode}):\n{done.stderr[-6000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)  # what the report quotes (pytest -s)
    return result


def ours(model, prompts, max_new_tokens: int, n_draft: int = 0):
    """Our Decoder, greedy, no vocabulary limit and no stop (as vLLM with ignore_eos)."""
    dec = Decoder(model)
    return dec.run(prompts, max_new_tokens=max_new_tokens, speculative=n_draft > 0, n_draft=n_draft)


def test_plain_greedy_equals_ours(exported, vllm):
    model, _, _, _, prompts = exported
    assert vllm["plain"]["token_ids"] == ours(model, prompts, MAX_TOKENS).tokens


@pytest.mark.parametrize("k", KS)
def test_mtp_speculative_equals_plain_greedy_and_ours(exported, vllm, k):
    model, _, _, _, prompts = exported
    spec = vllm["mtp"][str(k)]
    assert spec["token_ids"] == vllm["plain"]["token_ids"]
    assert spec["token_ids"] == ours(model, prompts, MAX_TOKENS, n_draft=k).tokens
    counters = spec["counters"]
    assert counters["num_draft_tokens"] == k * counters["num_drafts"]


def test_k1_counters_equal_our_acceptance(exported, vllm):
    """One module: vLLM drafts with module 1 at the last verified position, as we do, so every
    draft is the same. The counts differ only at a request's end: vLLM verifies a draft in
    every step, also the last one, where an accepted draft would pass max_tokens (it is
    counted, then cut); our DecodeStats counts a draft only where emitting it fits the budget.
    With one more token of budget, ours counts exactly the steps vLLM made (every step that
    starts below MAX_TOKENS emitted tokens) and no other."""
    model, _, _, _, prompts = exported
    counters = vllm["mtp"]["1"]["counters"]
    stats = ours(model, prompts, MAX_TOKENS + 1, n_draft=1).stats
    assert counters["num_accepted_tokens"] > 0, "no draft accepted: the model is too weak"
    assert counters["num_accepted_tokens"] < counters["num_draft_tokens"], "no draft rejected"
    assert counters["num_drafts"] == counters["num_draft_tokens"] == stats.proposed[1]
    assert counters["num_accepted_tokens"] == stats.accepted[1]
    assert counters["num_accepted_tokens_per_pos"] == [stats.accepted[1]]


def test_served_text_equals_mtp_generate(exported, vllm, capsys):
    """The OpenAI-compatible server (no speculation), one real HTTP request per prompt, against
    `mtp generate` (greedy; both stop at EOS)."""
    _, tok, ckpt, _, _ = exported
    served = vllm["serve"]
    for prompt, text in zip(PROMPTS, served["texts"]):
        # fp32 as vLLM here: --dtype auto would pick bf16 on a CPU with fast bf16.
        argv = ["generate", "--checkpoint", str(ckpt), "--prompt", prompt, "--dtype", "fp32"]
        assert main(argv + ["--max-tokens", str(MAX_TOKENS), "--completion-only"]) == 0
        # mtp generate ends its output with a newline where the text has none.
        assert capsys.readouterr().out == text + ("" if text.endswith("\n") else "\n")
