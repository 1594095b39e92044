"""Models go out and come in: the Hugging Face export against transformers itself, Meta's layout
both ways against a forward written from Meta's llama/model.py, `--init-from`, and the one-line
errors of mismatched inputs (docs/interop.md).

transformers 5.24 ships no convert_llama_weights_to_hf.py, so the rotary permutation is checked
by `meta_forward` below: Meta's interleaved complex rotary (view_as_complex over adjacent pairs),
run on the exported consolidated.00.pth as Meta's code would, compared with our logits.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from toy_models import STDLIB, save_checkpoint, stdlib_texts, train_toy_model

from mtp_dist.checkpoint import load_for_inference
from mtp_dist.checkpoint.hf import from_hf, to_hf
from mtp_dist.checkpoint.meta import export_meta
from mtp_dist.cli import main
from mtp_dist.config import ModelConfig, load_config
from mtp_dist.inference import Decoder
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece

transformers = pytest.importorskip("transformers")

PROBE_FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "colorsys.py"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> SentencePieceTokenizer:
    out = tmp_path_factory.mktemp("sp")
    return train_sentencepiece(sorted(STDLIB.glob("*.py"))[:80], out, vocab_size=1000, max_mb=1)


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory) -> SentencePieceTokenizer:
    """A tokenizer made like Llama-2's: dummy prefix, byte fallback, no "\\n" piece (newlines are
    <0x0A>), no PAD."""
    out = tmp_path_factory.mktemp("llama_sp") / "tokenizer.model"
    lines = [line for text in stdlib_texts("json") for line in text.split("\n")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out.with_suffix("")),
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(out)


def _trained_run(tmp_path_factory, tok, name: str) -> Path:
    # Small and short (the suite's budget): trained enough that drafts are sometimes accepted.
    model = train_toy_model(
        tok, stdlib_texts("json"), n_future=3, d_model=32, seq_len=32, batch_size=8, steps=40
    )
    return save_checkpoint(model, tok, tmp_path_factory.mktemp(name))


class _Runs(dict):
    """Trained on first use, so that a test run alone trains only the runs it reads."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, kind: str) -> Path:
        self[kind] = self.make(kind)
        return self[kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict[str, Path]:
    def make(kind: str) -> Path:
        tok = {
            "bytes": ByteTokenizer,
            "sentencepiece": lambda: request.getfixturevalue("sp_tok"),
            "llama": lambda: request.getfixturevalue("llama_tok"),
        }[kind]()
        return _trained_run(tmp_path_factory, tok, kind)

    return _Runs(make)


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def only_engine_notes(err: str) -> bool:
    """An export's stderr holds nothing but `mtp export: note:` lines (what an engine will not
    take of a small test model, e.g. vLLM's CPU head widths)."""
    return all(line.startswith("mtp export: note: ") for line in err.splitlines())


# -- Hugging Face ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_hf_export_matches_transformers(tmp_path, capsys, runs, kind):
    out = tmp_path / "hf"
    code, err = cli(capsys, "export", "hf", str(runs[kind]), str(out))
    assert code == 0 and only_engine_notes(err), err
    ours, tok = load_for_inference(runs[kind])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    for name in PROBE_FILES:  # real code: indentation, newlines, leading spaces, non-ASCII
        text = (STDLIB / name).read_text(encoding="utf-8")
        assert hf_tok(text)["input_ids"] == tok.encode(text), name
        assert hf_tok.decode(tok.encode(text)) == text
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    ids = torch.tensor([tok.encode(text)[: ours.cfg.max_seq_len]])
    with torch.no_grad():
        err = rel_err(hf(ids).logits, ours.next_token_logits(ids))
    print(f"{kind}: head-1 logits relative error {err:.2e}")
    assert err <= 1e-5
    prompts = [tok.encode(t[:150]) for t in stdlib_texts("json")[:3]]
    for prompt in prompts:
        mine = Decoder(ours, vocab_limit=tok.vocab_size).run([prompt], max_new_tokens=40)
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)
        new = theirs[0, len(prompt) :].tolist()
        if new and new[-1] == tok.eos_id:  # ours stops at EOS without emitting it
            new = new[:-1]
        assert new == mine.tokens[0]
    index = json.loads((out / "mtp_heads.json").read_text())
    assert index["n_future"] == 3 and [h["head"] for h in index["heads"]] == [2, 3]


def test_hf_names_round_trip(runs):
    model, _ = load_for_inference(runs["bytes"])
    state = model.state_dict()
    hf = to_hf(state, model.cfg)
    assert "model.layers.2.self_attn.q_proj.weight" in hf  # head 1 after 2 trunk layers
    assert "mtp_heads.3.mlp.down_proj.weight" in hf
    assert from_hf(hf, model.cfg).keys() == state.keys()


# -- Meta ------------------------------------------------------------------------------------
def meta_forward(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits (n_future, B, T, V) of every head, computed as Meta's llama/model.py does
    (interleaved complex rotary; `layers` = n_layers - n_future + 1 blocks, the trunk = layers[:-1],
    the heads = [layers[-1], *extra_heads])."""
    params = json.loads((directory / "params.json").read_text())
    w = torch.load(directory / "consolidated.00.pth", weights_only=True)
    dim, n_heads, eps = params["dim"], params["n_heads"], params["norm_eps"]
    n_kv = params.get("n_kv_heads") or n_heads  # Meta's repeat_kv: each k/v head serves a group
    hd, T = dim // n_heads, ids.shape[1]
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # (B, T, H, hd): adjacent pairs are the complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None]).flatten(3).type_as(x)

    def norm(x, weight):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)) * weight

    def block(x, p):
        B = x.shape[0]
        h = norm(x, w[p + "attention_norm.weight"])
        q, k, v = (h @ w[f"{p}attention.w{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(B, T, -1, hd) for t in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / math.sqrt(hd)
        scores = scores + torch.full((T, T), float("-inf")).triu(1)
        y = F.softmax(scores.float(), dim=-1) @ v.transpose(1, 2)
        x = x + y.transpose(1, 2).reshape(B, T, dim) @ w[p + "attention.wo.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        ff = F.silu(h @ w[p + "feed_forward.w1.weight"].T) * (h @ w[p + "feed_forward.w3.weight"].T)
        return x + ff @ w[p + "feed_forward.w2.weight"].T

    n_future = params["n_future_tokens"]
    n_layers = params["n_layers"] - n_future + 1  # Meta's len(self.layers)
    x = w["tok_embeddings.weight"][ids]
    for i in range(n_layers - 1):
        x = block(x, f"layers.{i}.")
    heads = [f"layers.{n_layers - 1}."] + [f"extra_heads.{j}." for j in range(n_future - 1)]
    return torch.stack([norm(block(x, p), w["norm.weight"]) @ w["output.weight"].T for p in heads])


def test_meta_export_matches_meta_forward(tmp_path, runs):
    ours, tok = load_for_inference(runs["sentencepiece"])
    export_meta(runs["sentencepiece"], tmp_path / "meta")
    ids = torch.tensor([tok.encode((STDLIB / "shlex.py").read_text())[:200]])
    logits = meta_forward(tmp_path / "meta", ids)
    with torch.no_grad():
        h, cos, sin = ours.trunk_forward(ids)
        mine = [ours.heads.logits(h, cos, sin, i) for i in range(3)]
    errs = [rel_err(logits[i], mine[i]) for i in range(3)]
    print(f"Meta forward vs ours, relative error per head: {errs}")
    assert max(errs) <= 1e-5


def test_grouped_query_attention_goes_out_and_comes_back(tmp_path, capsys):
    """A GQA model (4 query heads, 2 key/value heads): transformers' Llama with
    num_key_value_heads=2 gives its head-1 logits, Meta's forward (repeat_kv) every head's,
    and export meta -> import meta is bit-identical, n_kv_heads included."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=4, n_attn_heads=4, n_kv_heads=2,
                      n_future=2, max_seq_len=64, init_std=0.1)  # fmt: skip
    tok = ByteTokenizer()
    run = save_checkpoint(MTPModel(cfg).eval(), tok, tmp_path / "gqa")
    code, err = cli(capsys, "export", "hf", str(run), str(tmp_path / "hf"))
    assert code == 0 and only_engine_notes(err), err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert hf.config.num_key_value_heads == 2
    capsys.readouterr()  # transformers' loading progress bar
    ours, _ = load_for_inference(run)
    ids = torch.tensor([tok.encode((STDLIB / "shlex.py").read_text())[:60]])
    with torch.no_grad():
        assert rel_err(hf.eval()(ids).logits, ours.next_token_logits(ids)) <= 1e-5
        h, cos, sin = ours.trunk_forward(ids)
        mine = [ours.heads.logits(h, cos, sin, i) for i in range(2)]
    export_meta(run, tmp_path / "meta")
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["n_kv_heads"] == 2
    theirs = meta_forward(tmp_path / "meta", ids)
    assert max(rel_err(theirs[i], mine[i]) for i in range(2)) <= 1e-5
    code, err = cli(capsys, "import", "meta", str(tmp_path / "meta"), "--out",
                    str(tmp_path / "back"), "--max-seq-len", "64")  # fmt: skip
    assert (code, err) == (0, "")
    ckpt = next((tmp_path / "back" / "checkpoints").iterdir())
    assert load_config(ckpt / "config.yaml").model.n_kv_heads == 2
    before = torch.load(run / "model.pt", weights_only=True)
    after = torch.load(ckpt / "model.pt", weights_only=True)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_meta_round_trip_is_bit_identical(tmp_path, capsys, runs, llama_tok):
    run = runs["llama"]  # Llama-2-like tokenizer: dummy prefix, newline <0x0A>, no PAD
    assert cli(capsys, "export", "meta", str(run), str(tmp_path / "meta"))[0] == 0
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["n_layers"] == 5 and params["n_future_tokens"] == 3  # 2 trunk + 3 heads
    code, err = cli(
        capsys, "import", "meta", str(tmp_path / "meta"), "--out", str(tmp_path / "run"),
        "--max-seq-len", "256",
    )  # fmt: skip
    assert (code, err) == (0, "")
    before = torch.load(run / "model.pt", weights_only=True)
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    after = torch.load(ckpt / "model.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    original = load_config(run / "config.yaml").model
    imported = load_config(ckpt / "config.yaml").model
    # Meta's format writes the FFN width by its rule, ours stores it explicitly on import; the
    # toy checkpoint left pad_id to the tokenizer, the import resolves it.
    resolved = replace(original, ffn_hidden=original.ffn_width, pad_id=llama_tok.pad_id)
    assert imported == resolved
    model, tok = load_for_inference(tmp_path / "run")
    assert tok.piece(tok.newline_id) == "<0x0A>" and tok.pad_id == tok.unk_id
    prompts = [tok.encode(t[:150]) for t in stdlib_texts("json")[:3]]
    dec = Decoder(model, vocab_limit=tok.vocab_size)
    plain = dec.run(prompts, max_new_tokens=48)
    spec = dec.run(prompts, max_new_tokens=48, speculative=True)
    assert spec.tokens == plain.tokens
    print(f"imported model: {spec.stats.tokens_per_forward:.2f} tokens per forward")
    code = main(
        ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "import json\n",
         "--compare", "--max-tokens", "24"]
    )  # fmt: skip
    err = capsys.readouterr().err
    print(err)
    assert code == 0 and "identical to greedy: yes" in err


def test_init_from_continues_the_imported_weights(tmp_path, capsys, runs):
    from test_trainer import tiny_cfg

    from mtp_dist.training import Trainer

    src = runs["llama"]
    m = load_config(src / "config.yaml").model
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for text, i in zip(stdlib_texts("json"), range(6)):
        (corpus / f"f{i}.py").write_text(text)
    model_keys = [
        f"model.{k}={getattr(m, k)}"
        for k in ("d_model", "n_layers", "n_attn_heads", "n_future", "max_seq_len", "ffn_hidden")
    ]
    cfg = tiny_cfg(tmp_path / "cont", corpus, *model_keys, "train.max_steps=2")
    trainer = Trainer(cfg, init_from=src)
    before = torch.load(src / "model.pt")
    start = trainer.engine.model.state_dict()
    assert all(torch.equal(before[k], start[k]) for k in before)
    assert trainer.tokenizer.identity() == load_for_inference(src)[1].identity()
    history = trainer.fit()
    assert len(history) == 2 and all(math.isfinite(sum(h["head_losses"])) for h in history)
    # max_seq_len only sizes the rotary tables: a run may change it; the head count it may not.
    changed = [k for k in model_keys if "n_future" not in k and "max_seq_len" not in k]
    ok = tiny_cfg(tmp_path / "ok", corpus, *model_keys, "model.max_seq_len=128")
    Trainer(ok, init_from=src)
    bad = tiny_cfg(tmp_path / "bad", corpus, *changed, f"model.n_future={m.n_future - 1}")
    with pytest.raises(Exception, match=rf"differs: model\.n_future={m.n_future - 1} \("):
        Trainer(bad, init_from=src)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_init_from_an_import_in_a_tensor_parallel_layout(tmp_path, capsys, runs):
    """A Meta export -> import initialises a tensor-parallel run (2 gloo processes under
    torchrun, each cutting its slice of every weight) to the single-process run's first-step
    loss: the same data (tp=2 has one data-parallel rank), the same weights, so only the order
    of the tensor-parallel sums differs."""
    from mtp_dist.training import Trainer

    export_meta(runs["llama"], tmp_path / "meta")
    code, err = cli(
        capsys, "import", "meta", str(tmp_path / "meta"), "--out", str(tmp_path / "imported"),
        "--max-seq-len", "256",
    )  # fmt: skip
    assert (code, err) == (0, "")
    src = tmp_path / "imported"
    m = load_config(next((src / "checkpoints").iterdir()) / "config.yaml").model
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for text, i in zip(stdlib_texts("json"), range(6)):
        (corpus / f"f{i}.py").write_text(text)
    overrides = [
        *(f"model.{k}={getattr(m, k)}" for k in
          ("d_model", "n_layers", "n_attn_heads", "n_future", "max_seq_len", "ffn_hidden")),
        f"data.source={corpus}", "data.seq_len=32", "data.val_fraction=0.2",
        "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_steps=1",
        "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1", "train.device=cpu",
        "train.precision=fp32", "tracking.enabled=false",
    ]  # fmt: skip
    recipe = str(Path(__file__).parents[1] / "configs" / "tiny-cpu.yaml")
    single = Trainer(load_config(recipe, [f"run_dir={tmp_path / 'single'}", *overrides]),
                     init_from=src).fit()  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), "-m", "mtp_dist.cli", "train", recipe,
        f"run_dir={tmp_path / 'tp2'}", *overrides, "parallel.tensor=2", "parallel.zero_stage=0",
        "--init-from", str(src),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    layout = json.loads(next((tmp_path / "tp2" / "checkpoints").glob("*/layout.json")).read_text())
    assert layout["tensor"] == 2
    tp2 = [json.loads(x) for x in (tmp_path / "tp2" / "metrics.jsonl").read_text().splitlines()]
    print(f"first-step head losses: single {single[0]['head_losses']}, tp2 {tp2[0]['head_losses']}")
    # Per-head losses ~3-6; fp32 sums in another order differ by ~1e-6 (as in the distributed
    # tier's equivalence tests), a wrongly cut slice by far more.
    torch.testing.assert_close(
        torch.tensor(tp2[0]["head_losses"]), torch.tensor(single[0]["head_losses"]),
        atol=2e-6, rtol=0,
    )  # fmt: skip


# -- one-line errors -------------------------------------------------------------------------
@pytest.fixture
def meta_dir(tmp_path, runs) -> Path:
    return export_meta(runs["llama"], tmp_path / "meta")


def _edit_params(directory: Path, **changes) -> None:
    path = directory / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: _edit_params(d, vocab_size=700), "vocab_size=700, but the tokenizer has 600"),
        (lambda d: _edit_params(d, n_future_tokens=4), "n_future_tokens=4 in params.json"),
        (lambda d: _edit_weights(d, lambda s: s.pop("norm.weight")), "missing ['norm.weight']"),
        (lambda d: _edit_weights(d, lambda s: s.update(bias=torch.ones(1))), "unexpected ['bias']"),
        (
            lambda d: _edit_weights(d, lambda s: s.update({"output.weight": torch.ones(3, 3)})),
            "output.weight has shape (3, 3)",
        ),
        (lambda d: _edit_params(d, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
        (lambda d: _edit_params(d, n_kv_heads=2), "layers.0.attention.wk.weight has shape"),
    ],
)
def test_import_mismatches_are_one_line(tmp_path, capsys, meta_dir, breakage, message):
    breakage(meta_dir)
    code, err = cli(capsys, "import", "meta", str(meta_dir), "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("mtp import meta: ")
    assert message in err, err
    assert not (tmp_path / "r" / "checkpoints").exists() or not any(
        (tmp_path / "r" / "checkpoints").glob("step_*")
    )


def test_export_refuses_a_sharded_checkpoint(tmp_path, capsys, runs):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.yaml", "complete.json"):
        (sharded / name).write_bytes((runs["bytes"] / name).read_bytes())
    for fmt in ("hf", "meta"):
        code, err = cli(capsys, "export", fmt, str(sharded), str(tmp_path / fmt))
        assert code == 2 and err.count("\n") == 1
        assert "sharded" in err and "mtp checkpoint consolidate" in err
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("arch", ["parallel", "chained"])
def test_export_says_which_engine_will_not_take_it(tmp_path, capsys, arch):
    """A head width vLLM's CPU attention does not take is said at export time, in one line,
    and only then: the export is still written (transformers loads it)."""
    tok = ByteTokenizer()
    notes = {}
    for d, heads in ((32, 2), (128, 2)):  # head width 16: refused by vLLM; 64: taken
        cfg = ModelConfig(vocab_size=320, d_model=d, n_layers=3, n_attn_heads=heads,
                          n_future=2, max_seq_len=32, mtp_arch=arch)  # fmt: skip
        torch.manual_seed(0)
        save_checkpoint(MTPModel(cfg), tok, tmp_path / f"run{d}")
        code, err = cli(capsys, "export", "hf", str(tmp_path / f"run{d}"), str(tmp_path / f"o{d}"))
        assert code == 0 and (tmp_path / f"o{d}" / "config.json").is_file()
        notes[d] = err.strip().splitlines()
    assert len(notes[32]) == 1 and "head width 16" in notes[32][0], notes[32]
    assert "vLLM" in notes[32][0]
    assert notes[128] == []
