"""Chained models (model.mtp_arch=chained) out to GLM-4.5's layout and back, with transformers as
the reference (docs/interop.md, "Chained models: the GLM-4.5 layout"): its Glm4MoeForCausalLM
gives the main model's logits, its MtpModel (the module transformers' `generate(use_mtp=True)`
drafts with) each module's, its MTP generation the same tokens and accepted drafts as our
decoder; an export -> import round trip is bit-identical; a checkpoint written by transformers
itself comes in; what the layout cannot carry is refused in one line.

transformers computes its rotary tables in float32 whatever the model's dtype, so float64 runs
agree to about 1e-7 relative, not to float64 precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hf_checkpoints import byte_bpe_tokenizer, save_glm_model, tokenizer_size
from toy_models import save_checkpoint, stdlib_texts, template_code
from transformers.modeling_layers import MtpModel

from mtp_dist.checkpoint import load_for_inference
from mtp_dist.cli import main
from mtp_dist.config import ModelConfig
from mtp_dist.inference import Decoder
from mtp_dist.model import MTPModel
from mtp_dist.tokenizers import ByteTokenizer

TOL = 1e-6  # relative, float64 on both sides (transformers' rotary tables are float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def only_engine_notes(err: str) -> bool:
    """An export's stderr holds nothing but `mtp export: note:` lines (what an engine will not
    take of a small test model, e.g. vLLM's CPU head widths)."""
    return all(line.startswith("mtp export: note: ") for line in err.splitlines())


def train_chained(tok, texts: list[str], *, steps: int, **options) -> MTPModel:
    """A chained model (2 trunk layers, 3 depths, d 32) trained briefly on the texts: enough for
    its modules' drafts to be accepted sometimes, not always."""
    torch.manual_seed(0)
    ids = torch.tensor([t for text in texts for t in tok.encode(text) + [tok.eos_id]])
    settings = dict(vocab_size=320, d_model=32, n_layers=5, n_attn_heads=4, n_future=3)
    cfg = ModelConfig(**{**settings, **options}, max_seq_len=128, mtp_arch="chained")
    model = MTPModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    window, gen = 32 + cfg.n_future, torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window, (8,), generator=gen)
        batch = torch.stack([ids[s : s + window] for s in starts])
        loss = model(batch[:, :32], batch[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def random_chained(**options) -> MTPModel:
    """An untrained chained model whose norm gains and biases are random too (a swapped norm
    or a dropped bias shows in the logits)."""
    torch.manual_seed(0)
    settings = dict(vocab_size=320, d_model=32, n_layers=5, n_attn_heads=4, n_future=3)
    cfg = ModelConfig(**{**settings, **options}, max_seq_len=128, mtp_arch="chained")
    model = MTPModel(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


# Options an exported chained model may have: q/k/v biases (GLM's attention_bias), tied
# embeddings, grouped-query attention with an explicit head width, an explicit MLP width.
OPTIONS = {
    "plain": {},
    "options": dict(attn_bias=True, tie_embeddings=True, n_kv_heads=2, head_dim=12, ffn_hidden=72),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the option sets (random weights) and of a briefly trained model."""
    out = {}
    for name, options in OPTIONS.items():
        out[name] = save_checkpoint(
            random_chained(**options), ByteTokenizer(), tmp_path_factory.mktemp(name)
        )
    # Templated code: drafts right inside a template, wrong at its random numbers.
    model = train_chained(ByteTokenizer(), template_code(40, seed=0), steps=150)
    out["trained"] = save_checkpoint(model, ByteTokenizer(), tmp_path_factory.mktemp("trained"))
    return out


def load_hf(path: Path, dtype=torch.float32):
    """The export as a user loads it: the shipped modeling file names the MTP layers."""
    # grouped_mm, transformers' default MoE kernel, takes no float64.
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=True, experts_implementation="eager"
    ).eval()


@torch.no_grad()
def transformers_depths(hf, ids: torch.Tensor, n_future: int) -> list[torch.Tensor]:
    """Logits of depth 0..n-1 over `ids` (1, T + n - 1) as transformers computes them: the main
    model on ids[:, :T], then its MtpModel's layers one after the other, module k reading the
    previous depth's output and the tokens k positions ahead at their own positions (as its MTP
    generation feeds them). The token embedding at sequence position 0 is zeroed, the engines'
    convention (docs/interop.md: transformers' own generation does not zero it)."""
    T = ids.shape[1] - n_future + 1
    out = hf(ids[:, :T], output_hidden_states=True)
    logits, h = [out.logits], out.hidden_states[-1]  # after the final norm
    mtp = MtpModel.from_pretrained(hf).eval()
    for k in range(1, n_future):
        tokens = ids[:, k : k + T]
        embedded = mtp.embed_tokens(tokens).clone()
        embedded[:, 0] = 0
        positions = torch.arange(k, k + T)[None]
        h = mtp.forward_layer(k - 1, h, positions, None, inputs_embeds=embedded)
        logits.append(mtp._project_to_logits(h))
    return logits


@torch.no_grad()
def our_depths(model: MTPModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """The same from our model: next_token_logits, then ChainedHeads.depth_hidden + project."""
    n = model.cfg.n_future
    T = ids.shape[1] - n + 1
    x, labels = ids[:, :T], ids[:, 1:]
    h, cos, sin = model.trunk_forward(x)
    embedded = model.embed_ahead(labels, torch.arange(T))
    logits, hk = [model.next_token_logits(x)], model.heads.depth_hidden(0, h, None, cos, sin)
    for k in range(1, n):
        hk = model.heads.depth_hidden(k, hk, embedded[k - 1], cos, sin)
        logits.append(model.heads.project(hk))
    return logits


def sample_ids(tok, length: int) -> torch.Tensor:
    text = "\n".join(stdlib_texts("json")[1:3])
    return torch.tensor([tok.encode(text)[:length]])


@pytest.mark.parametrize("kind", ["plain", "options", "trained"])
def test_export_matches_transformers_depth_by_depth(tmp_path, capsys, runs, kind):
    out = tmp_path / "glm"
    code, err = cli(capsys, "export", "hf", str(runs[kind]), str(out))
    assert code == 0 and only_engine_notes(err), err
    ours, tok = load_for_inference(runs[kind])
    cfg, config = ours.cfg, json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"]
    assert config["num_hidden_layers"] == cfg.trunk_layers + 1
    assert config["num_nextn_predict_layers"] == cfg.n_future - 1
    assert config["first_k_dense_replace"] == cfg.trunk_layers  # depth 0 is the MoE layer
    assert config["partial_rotary_factor"] == config["rope_parameters"]["partial_rotary_factor"]
    assert config["partial_rotary_factor"] == 1.0
    hf = load_hf(out, torch.float64)
    capsys.readouterr()  # transformers' loading progress bars
    assert type(hf.model.layers[cfg.trunk_layers].mlp).__name__ == "Glm4MoeMoE"
    ids = sample_ids(tok, 60 + cfg.n_future - 1)
    theirs, mine = transformers_depths(hf, ids, cfg.n_future), our_depths(ours.double(), ids)
    errs = [rel_err(a, b) for a, b in zip(theirs, mine)]
    print(f"{kind}: transformers vs ours, relative error per depth (float64): {errs}")
    assert len(errs) == cfg.n_future and max(errs) <= TOL


@pytest.mark.parametrize("kind", ["plain", "options", "trained"])
def test_export_import_round_trip_is_bit_identical(tmp_path, capsys, runs, kind):
    assert cli(capsys, "export", "hf", str(runs[kind]), str(tmp_path / "glm"))[0] == 0
    code, err = cli(capsys, "import", "hf", str(tmp_path / "glm"), "--out", str(tmp_path / "run"))
    assert (code, err) == (0, "")
    before = torch.load(runs[kind] / "model.pt", weights_only=True)
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    after = torch.load(ckpt / "model.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    a, b = load_for_inference(runs[kind])[0].cfg, load_for_inference(ckpt)[0].cfg
    for key in ("mtp_arch", "n_future", "trunk_layers", "ffn_width", "kv_heads", "attn_head_dim"):
        assert getattr(a, key) == getattr(b, key), key
    assert (a.attn_bias, a.tie_embeddings) == (b.attn_bias, b.tie_embeddings)


def _record_matches(monkeypatch) -> list[int]:
    """transformers' accepted drafts per step: update_candidate_strategy receives n_matches."""
    matches: list[int] = []
    original = transformers.generation.candidate_generator.MTPCandidateGenerator
    update = original.update_candidate_strategy

    def record(self, input_ids, scores, num_matches):
        matches.append(int(num_matches))
        return update(self, input_ids, scores, num_matches)

    monkeypatch.setattr(original, "update_candidate_strategy", record)
    return matches


def _zero_first_position(monkeypatch) -> None:
    """transformers' MTP layers with the engines' convention: the token embedding of the first
    sequence position zeroed. Module i's slot j holds the token at position j + i + 1 (its MTP
    generation passes each token's own position), so the first slot has position i + 1."""
    forward_layer = MtpModel.forward_layer

    def zeroed(self, layer_idx, hidden, position_ids, cache, input_ids=None, inputs_embeds=None,
               **kwargs):  # fmt: skip
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        keep = (position_ids != layer_idx + 1)[..., None].to(inputs_embeds.dtype)
        return forward_layer(
            self, layer_idx, hidden, position_ids, cache, inputs_embeds=inputs_embeds * keep,
            **kwargs,
        )  # fmt: skip

    monkeypatch.setattr(MtpModel, "forward_layer", zeroed)


def test_mtp_generation_equals_greedy_and_accepts_what_ours_does(tmp_path, capsys, runs):
    """generate(use_mtp=True) == its plain greedy == our greedy, and per block position the
    drafts transformers accepts are the ones our chained speculative decoding accepts."""
    out = tmp_path / "glm"
    code, err = cli(capsys, "export", "hf", str(runs["trained"]), str(out))
    assert code == 0 and only_engine_notes(err), err
    ours, tok = load_for_inference(runs["trained"])
    hf = load_hf(out)
    n, new = ours.cfg.n_future, 48
    dec = Decoder(ours, vocab_limit=tok.vocab_size)
    prompts = [tok.encode(t[:50]) for t in template_code(3, seed=1)]  # + new < max_seq_len
    default_rates, zeroed_rates = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        plain = dec.run([prompt], max_new_tokens=new)
        spec = dec.run([prompt], max_new_tokens=new, speculative=True)
        assert spec.tokens == plain.tokens
        greedy = hf.generate(ids, do_sample=False, max_new_tokens=new)[0, len(prompt) :].tolist()
        assert tok.eos_id not in greedy  # an EOS would end the two runs differently
        assert greedy == plain.tokens[0]
        with monkeypatch_context() as mp:
            matches = _record_matches(mp)
            drafted = hf.generate(ids, do_sample=False, max_new_tokens=new, use_mtp=True)
            default_rates.append(matches[1:])
        assert drafted[0, len(prompt) :].tolist() == greedy
        with monkeypatch_context() as mp:
            matches = _record_matches(mp)
            _zero_first_position(mp)
            drafted = hf.generate(ids, do_sample=False, max_new_tokens=new, use_mtp=True)
        assert drafted[0, len(prompt) :].tolist() == greedy
        # matches[0] is the prefill (no drafts yet); our stats count the prefill as a step.
        steps = matches[1:]
        assert spec.stats.steps == len(steps) + 1
        theirs = [sum(m >= j for m in steps) for j in range(1, n)]
        assert theirs == spec.stats.accepted[1:], (theirs, spec.stats.accepted)
        zeroed_rates.append(steps)
    print(f"accepted drafts per step, transformers as it is: {default_rates}")
    print(f"accepted drafts per step, first position zeroed (= ours): {zeroed_rates}")
    assert any(m > 0 for steps in zeroed_rates for m in steps)  # drafting was exercised


def monkeypatch_context():
    return pytest.MonkeyPatch.context()


def test_a_glm_checkpoint_from_transformers_comes_in_and_goes_out(tmp_path, capsys):
    """A chained checkpoint transformers wrote (a trunk MoE layer too, GQA, q/k/v biases) is
    imported as a chained run whose depths give transformers' logits; exported again and
    re-imported, its parameters are unchanged."""
    src = tmp_path / "src"
    byte_bpe_tokenizer(src)
    save_glm_model(src, vocab=tokenizer_size(src) + 4)
    capsys.readouterr()  # save_pretrained's progress bar
    code, err = cli(capsys, "import", "hf", str(src), "--out", str(tmp_path / "run"))
    assert (code, err) == (0, "")
    ours, tok = load_for_inference(tmp_path / "run")
    assert ours.cfg.chained and ours.cfg.n_future == 3 and ours.cfg.trunk_layers == 2
    main_model = transformers.Glm4MoeForCausalLM.from_pretrained(
        src, dtype=torch.float64, experts_implementation="eager"
    )
    # The no-remote-code way (docs/interop.md): name this checkpoint's MTP layers.
    main_model._keys_to_ignore_on_load_unexpected = {
        r"model\.layers\.3\..*",
        r"model\.layers\.4\..*",
    }
    capsys.readouterr()
    ids = torch.tensor([tok.encode(stdlib_texts("json")[0])[:50]])
    theirs = transformers_depths(main_model.eval(), ids, 3)
    mine = our_depths(ours.double(), ids)
    errs = [rel_err(a, b) for a, b in zip(theirs, mine)]
    print(f"imported GLM checkpoint: relative error per depth (float64): {errs}")
    assert max(errs) <= TOL
    assert cli(capsys, "export", "hf", str(tmp_path / "run"), str(tmp_path / "out"))[0] == 0
    assert (
        cli(capsys, "import", "hf", str(tmp_path / "out"), "--out", str(tmp_path / "again"))[0] == 0
    )
    first = torch.load(next((tmp_path / "run" / "checkpoints").iterdir()) / "model.pt")
    second = torch.load(next((tmp_path / "again" / "checkpoints").iterdir()) / "model.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_what_the_layout_cannot_carry_is_refused_in_one_line(tmp_path, capsys, runs):
    # Export: vLLM's CPU MoE kernel cannot take an MLP width that is not a multiple of 4.
    odd = save_checkpoint(random_chained(ffn_hidden=70), ByteTokenizer(), tmp_path / "odd")
    _one_line(*cli(capsys, "export", "hf", str(odd), str(tmp_path / "o")), "multiple of 4", "vLLM")
    assert not (tmp_path / "o").exists()
    # Import: a real mixture of experts.
    moe = tmp_path / "moe"
    byte_bpe_tokenizer(moe)
    save_glm_model(moe, vocab=tokenizer_size(moe), real_moe=True)
    capsys.readouterr()
    run = tmp_path / "run"
    _one_line(*cli(capsys, "import", "hf", str(moe), "--out", str(run)), "real mixture of experts")
    assert not run.exists()
    # Import: a chained checkpoint brings its own modules; a partial rotary embedding.
    glm = tmp_path / "glm"
    assert cli(capsys, "export", "hf", str(runs["plain"]), str(glm))[0] == 0
    _one_line(
        *cli(capsys, "import", "hf", str(glm), "--out", str(run), "--n-future", "4"),
        "num_nextn_predict_layers",
    )
    _one_line(
        *cli(capsys, "import", "hf", str(glm), "--out", str(run), "--head-init", "random"),
        "--head-init",
    )
    config = json.loads((glm / "config.json").read_text())
    config["rope_parameters"]["partial_rotary_factor"] = 0.5
    (glm / "config.json").write_text(json.dumps(config))
    _one_line(*cli(capsys, "import", "hf", str(glm), "--out", str(run)), "partial_rotary_factor")
    assert not run.exists()
