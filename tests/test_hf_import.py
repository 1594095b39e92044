"""`mtp import hf`: Llama-family checkpoints written by transformers itself come in with their
own tokenizer and gain heads; transformers is the reference for logits, tokenizer ids and greedy
tokens (docs/interop.md, "Coming in from Hugging Face").

Each supported architecture and option is one checkpoint: plain Llama; Llama 3.x's llama3 rope
scaling with tied embeddings, grouped-query attention and an explicit head_dim; a sharded index;
Qwen2's q/k/v biases; Mistral (with a window no shorter than the context); a
sentencepiece-converted tokenizer (Llama 2 / TinyLlama). Bad inputs are one line, exit 2, and
leave no run directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_checkpoints import (
    byte_bpe_tokenizer,
    corpus_texts,
    save_model,
    sentencepiece_tokenizer,
    tokenizer_size,
)

from mtp_dist.checkpoint import load_for_inference
from mtp_dist.checkpoint.hf_import import import_hf
from mtp_dist.cli import main
from mtp_dist.inference import Decoder
from mtp_dist.model import Owner, canonical_name

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the rescaled band covers frequencies our short test sequences feel
    "original_max_position_embeddings": 64,
}
# name -> (architecture, tokenizer kind, save_pretrained options)
CASES = {
    "llama": ("llama", "bpe", {}),
    "llama3_tied_gqa_headdim": (
        "llama",
        "bpe",
        {
            "rope_parameters": LLAMA3_ROPE,
            "tie_word_embeddings": True,
            "num_key_value_heads": 2,
            "head_dim": 32,
        },
    ),
    "llama_sharded": ("llama", "bpe", {"shard": "60KB"}),
    "qwen2_bias": ("qwen2", "qwen", {"num_key_value_heads": 2}),
    "mistral": ("mistral", "bpe", {"sliding_window": 256, "head_dim": 16}),
    "llama2_spm": ("llama", "spm", {}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    byte_bpe_tokenizer(root / "bpe")
    byte_bpe_tokenizer(root / "qwen", style="qwen2")
    sentencepiece_tokenizer(root / "spm", tmp_path_factory.mktemp("spm_work"))
    return {kind: root / kind for kind in ("bpe", "qwen", "spm")}


def make_checkpoint(out: Path, case: str, tokenizers_dir: dict[str, Path], **change) -> Path:
    arch, tok, options = CASES[case]
    options = {**options, **change}
    vocab = options.pop("vocab_size", tokenizer_size(tokenizers_dir[tok]))
    save_model(out, arch, vocab=vocab, **options)
    for file in tokenizers_dir[tok].iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizers_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {case: make_checkpoint(root / case, case, tokenizers_dir) for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(tmp_path, checkpoints, case):
    source = checkpoints[case]
    import_hf(source, tmp_path / "run", n_future=3)
    ours, tok = load_for_inference(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(source)
    text = corpus_texts()[1]
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids[:200]])
    with torch.no_grad():
        err = rel_err(ours.next_token_logits(ids), hf(ids).logits)
    print(f"{case}: head-1 logits relative error {err:.2e}")
    assert err <= 1e-5
    decoder = Decoder(ours, vocab_limit=tok.vocab_size)
    prompts = [tok.encode(t[:120]) for t in corpus_texts()[2:5]]
    for prompt in prompts:
        mine = decoder.run([prompt], max_new_tokens=24)
        theirs = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
        )
        new = theirs[0, len(prompt) :].tolist()
        if new and new[-1] == tok.eos_id:  # ours stops at EOS without emitting it
            new = new[:-1]
        assert new == mine.tokens[0], case
        spec = decoder.run([prompt], max_new_tokens=24, speculative=True)
        assert spec.tokens == mine.tokens  # self-speculative = plain greedy


def test_new_heads_copy_the_last_layer_or_are_initialised(tmp_path, checkpoints):
    source = checkpoints["qwen2_bias"]
    import_hf(source, tmp_path / "copy", n_future=3)
    import_hf(source, tmp_path / "random", n_future=3, head_init="random")
    copied, _ = load_for_inference(tmp_path / "copy")
    fresh, _ = load_for_inference(tmp_path / "random")
    state_c, state_r = copied.state_dict(), fresh.state_dict()
    for path in ("attn.wq.weight", "attn.wq.bias", "mlp.w_down.weight", "mlp_norm.weight"):
        head1 = state_c[canonical_name(Owner("head", 0), path)]
        for i in (1, 2):
            name = canonical_name(Owner("head", i), path)
            assert torch.equal(state_c[name], head1)
            assert not torch.equal(state_r[name], head1)
        assert torch.equal(state_r[canonical_name(Owner("head", 0), path)], head1)
    assert torch.equal(state_r["heads.head1__attn__wq__bias"], torch.zeros(64))
    assert float(state_r["heads.head2__attn__wq__weight"].std()) == pytest.approx(0.02, rel=0.1)


def test_import_config(tmp_path, checkpoints):
    import yaml

    ckpt = import_hf(checkpoints["llama3_tied_gqa_headdim"], tmp_path / "run", n_future=4)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    model = cfg["model"]
    assert model["n_layers"] == 4 and model["n_future"] == 4 and not model["parameter_matched"]
    assert model["tie_embeddings"] and model["head_dim"] == 32 and model["n_kv_heads"] == 2
    assert model["rope_scaling"]["type"] == "llama3"
    assert model["rope_scaling"]["original_max_position_embeddings"] == 64
    assert cfg["data"]["tokenizer"] == "hf"
    meta = json.loads((ckpt / "complete.json").read_text())
    assert meta["format"] == "hf" and meta["head_init"] == "copy"


def _edit_config(path: Path, **change) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))


def _copy(source: Path, out: Path) -> Path:
    out.mkdir()
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


def _bad(tmp_path, checkpoints, name: str, tokenizers_dir) -> tuple[Path, list[str]]:
    """A broken checkpoint directory and extra command-line arguments, by case name."""
    base = checkpoints["llama"]
    src = tmp_path / "src"
    extra: list[str] = []
    if name == "not_a_checkpoint":
        src.mkdir()
        (src / "README.md").write_text("hello")
    elif name == "missing_shard":
        _copy(checkpoints["llama_sharded"], src)
        next(src.glob("model-0000*-of-*.safetensors")).unlink()
    elif name == "shape_disagrees":
        _edit_config(_copy(base, src), intermediate_size=96)
    elif name == "tokenizer_exceeds_embedding":
        make_checkpoint(src, "llama", tokenizers_dir, vocab_size=128)
    elif name == "n_future_0":
        _copy(base, src)
        extra = ["--n-future", "0"]
    elif name == "out_exists":
        _copy(base, src)
        (tmp_path / "run").mkdir()
    elif name == "unknown_architecture":
        _edit_config(_copy(base, src), architectures=["GPTNeoXForCausalLM"])
    elif name == "yarn_rope":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
        _edit_config(_copy(base, src), rope_parameters=rope)
    elif name == "sliding_window":
        make_checkpoint(src, "mistral", tokenizers_dir, sliding_window=32)
    return src, extra


BAD = {
    "not_a_checkpoint": "no config.json",
    "missing_shard": "which is missing",
    "shape_disagrees": "has shape",
    "tokenizer_exceeds_embedding": "more than the embedding",
    "n_future_0": "--n-future must be >= 1",
    "out_exists": "already exists",
    "unknown_architecture": "GPTNeoXForCausalLM",
    "yarn_rope": "rope_parameters.rope_type='yarn'",
    "sliding_window": "sliding_window=32",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(
    tmp_path, capsys, checkpoints, tokenizers_dir, name
):
    src, extra = _bad(tmp_path, checkpoints, name, tokenizers_dir)
    existed = (tmp_path / "run").exists()
    capsys.readouterr()  # transformers' own progress output while the fixture was written
    code = main(["import", "hf", str(src), "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mtp import hf: ") and err.count("\n") == 1, err
    assert BAD[name] in err, err
    if not existed:
        assert not (tmp_path / "run").exists()
    else:
        assert not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("case", ["llama3_tied_gqa_headdim", "qwen2_bias", "llama2_spm"])
def test_export_gives_back_the_checkpoint(tmp_path, checkpoints, case):
    """import -> export: transformers loads the export as the source's architecture, with the
    source's exact weights (logits bit-identical) and its tokenizer files unchanged."""
    source = checkpoints[case]
    import_hf(source, tmp_path / "run", n_future=2)
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(back) is type(theirs)
    want = dict(theirs.state_dict())
    got = dict(back.state_dict())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.tensor(
        [transformers.AutoTokenizer.from_pretrained(out)(corpus_texts()[0])["input_ids"][:100]]
    )
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, theirs.eval()(ids).logits)
    assert json.loads((out / "mtp_heads.json").read_text())["n_future"] == 2


def test_imported_model_runs_like_a_native_one(tmp_path, capsys, checkpoints):
    """`mtp generate --compare`, `mtp eval` and `mtp heldout` on an imported checkpoint (the
    tied, llama3-scaled, GQA one): speculative output identical to greedy, scores produced."""
    run = tmp_path / "run"
    import_hf(checkpoints["llama3_tied_gqa_headdim"], run, n_future=3)
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(run), "--prompt", "def f(x):", "--compare"]
    assert main([*args, "--max-tokens", "24"]) == 0
    assert "identical to greedy: yes" in capsys.readouterr().err
    code = main(["eval", "--checkpoint", str(run), "--benchmark", "mbpp", "--limit", "2",
                 "--samples", "0", "--max-tokens", "16", "--no-mlflow",
                 "--out", str(tmp_path / "eval.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "eval.json").read_text())
    files = tmp_path / "held"
    files.mkdir()
    for i, text in enumerate(corpus_texts()[:2]):
        (files / f"f{i}.py").write_text(text)
    assert main(["heldout", "--checkpoint", str(run), "--files", str(files), "--no-mlflow",
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report
