"""The checkpoint's own Hugging Face tokenizer (kind "hf"), against transformers itself.

Offline: the tokenizers are made here the way the checkpoints' are laid out, from code of the
running interpreter's standard library. A byte-level BPE with Llama 3's split regex and special
tokens (Llama 3 / SmolLM2 / Qwen2 family), the same with Qwen2's pipeline (NFC, single digits)
and its specials, and a sentencepiece BPE converted by transformers (Llama 2 / TinyLlama: byte
fallback, "▁" dummy prefix, <unk> <s> </s>, no pad). The reference for every id is
`AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)`, for the legacy Llama 2 file
sentencepiece itself.
"""

from __future__ import annotations

import functools
import json
import pickle
import shutil
import sysconfig
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm

from mtp_dist.checkpoint import padded_vocab
from mtp_dist.cli import main
from mtp_dist.tokenizers import (
    PretrainedTokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
)
from mtp_dist.tokenizers.hf import save_hf_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
RECIPE = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [  # Llama 3.1's first ids after the BPE vocabulary, in its order
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]
QWEN2_SPECIALS = [  # (content, special) as Qwen2.5 has them: the fim tokens are not special
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_pad|>", True),
    ("<|fim_prefix|>", False),
    ("<|fim_pad|>", False),
]
# variant -> (bos, eos, pad) the checkpoint's files make us choose
EXPECTED = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"),
    "llama3.0": ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"),
    "llama3-own-pad": ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_2|>"),
    "qwen2.5": ("<|endoftext|>", "<|endoftext|>", "<|vision_pad|>"),
    "llama2": ("<s>", "</s>", "<unk>"),
}


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def _stdlib_text(paths) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in paths]


@functools.cache
def real_texts() -> list[str]:
    """~20 standard-library files (none the BPE trained on; 10 with non-ASCII text), one with
    CRLF line ends and one indented with tabs."""
    non_ascii = []
    for p in sorted(STDLIB.glob("*/*.py")):
        if p.parent.name in ("site-packages", "email"):  # not the stdlib / already below
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if "\ufffd" not in text and any(ord(c) > 127 for c in text) and len(text) < 60_000:
            non_ascii.append(text)
        if len(non_ascii) == 10:
            break
    plain = _stdlib_text(sorted((STDLIB / "email").glob("*.py"))[:8])
    crlf = plain[0].replace("\n", "\r\n")
    tabs = plain[1].replace("    ", "\t")
    short = [
        "",
        "\n",
        "x",
        "中文 # 日本語 😀🚀 👩‍👩‍👧\n",
        "a  b\t\tc \n\n\n  d",
        "digits 1234567 3.14",
        "e\u0301 (NFD), \ufb01 (a ligature)",
    ]
    return non_ascii + plain + [crlf, tabs] + short


def special_texts(tok: PretrainedTokenizer) -> list[str]:
    """Special tokens written literally in code (the pad's too)."""
    names = [tok.piece(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id)]
    return [
        f"x = '{names[0]}' + \"{names[1]}\"\nif s == '{names[2]}':\n    pass\n",
        f"{names[1]}{names[0]}def f():\n\treturn 1{names[1]}",
        f"  {names[0]} leading space, then a special",
    ]


# -- fixtures: tokenizer directories as the checkpoints lay them out ------------------------
@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A byte-level BPE (~2000 merges) trained on ~400 KB of stdlib code, no specials yet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size > 400_000:
            break
    backend = Tokenizer(models.BPE(ignore_merges=True))  # as Llama 3's tokenizer.json
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=256 + 2000, initial_alphabet=alphabet)
    backend.train_from_iterator(texts, trainer)
    return backend.to_str()


def _save(backend, out: Path, config: dict | None = None, **names) -> Path:
    """save_pretrained of transformers, then tokenizer_config.json keys as a checkpoint has them."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    fast.save_pretrained(out)
    if config:
        path = out / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    return out


def _llama3(bpe_json: str, out: Path, specials: list[str], **names) -> Path:
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(bpe_json)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", **names}
    return _save(backend, out, {"tokenizer_class": "PreTrainedTokenizerFast"}, **names)


def _qwen(bpe_json: str, out: Path) -> Path:
    """Qwen2.5 base: NFC, single-digit split, no BOS (config.json has an id), pad = eos."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers

    backend = Tokenizer.from_str(bpe_json)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.add_tokens([AddedToken(s, special=sp, normalized=False) for s, sp in QWEN2_SPECIALS])
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None}
    _save(backend, out, config, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    eos = backend.token_to_id("<|endoftext|>")
    (out / "config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}))
    return out


def _llama2_sp(out: Path) -> Path:
    """A sentencepiece model trained like Llama 2's (identity normalisation, whitespace kept,
    digits split, byte fallback, dummy prefix; <unk> <s> </s> = 0 1 2, no pad)."""
    lines = [
        line for text in _stdlib_text(sorted(STDLIB.glob("*.py"))[:12]) for line in text.split("\n")
    ]
    out.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return out / "tokenizer.model"


def _llama2(model_file: Path, out: Path) -> Path:
    """transformers' conversion, saved; then the tokenizer_config.json / special_tokens_map.json
    of transformers 4 (AddedToken dicts) that Llama 2 and TinyLlama ship, and tokenizer.model."""
    src = out.parent / "llama2_src"
    src.mkdir()
    shutil.copy(model_file, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False})
    )
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    shutil.copy(model_file, out / "tokenizer.model")
    added = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False}
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key, content in (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>")):
        config[key] = {**added, "content": content, "single_word": False}
    config |= {"pad_token": None, "legacy": False, "add_bos_token": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
    return out


@pytest.fixture(scope="module")
def llama2_model(tmp_path_factory) -> Path:
    return _llama2_sp(tmp_path_factory.mktemp("sp") / "model")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, bpe_json, llama2_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama3": _llama3(bpe_json, root / "llama3", LLAMA3_SPECIALS),
        "llama3.0": _llama3(
            bpe_json, root / "llama3.0", [s for s in LLAMA3_SPECIALS if "pad" not in s]
        ),
        "llama3-own-pad": _llama3(
            bpe_json, root / "own", LLAMA3_SPECIALS, pad_token="<|reserved_special_token_2|>"
        ),
        "qwen2.5": _qwen(bpe_json, root / "qwen2.5"),
        "llama2": _llama2(llama2_model, root / "llama2"),
    }


def _reference(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(directory)


def _ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


def _hf_decode(hf, ids: list[int]) -> str:
    return hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# -- the tokenizer against transformers -----------------------------------------------------
@pytest.mark.parametrize("variant", list(EXPECTED))
def test_ids_and_text_equal_transformers(model_dirs, variant):
    tok = PretrainedTokenizer.from_model_dir(model_dirs[variant])
    hf = _reference(model_dirs[variant])
    for text in real_texts():
        ids = tok.encode(text)
        assert ids == _ids(hf, text), text[:60]
        assert tok.decode(ids) == _hf_decode(hf, ids)
        if text[:1] != " ":  # transformers' Llama decoder strips the dummy prefix's space
            # Qwen2's pipeline starts with NFC: text comes back in that form
            nfc = variant.startswith("qwen")
            assert tok.decode(ids) == (unicodedata.normalize("NFC", text) if nfc else text)
        assert tok.pad_id not in ids  # ordinary text never produces the pad
    for text in special_texts(tok):  # as AutoTokenizer: a literal special is that token
        ids = tok.encode(text)
        assert ids == _ids(hf, text), text
        assert tok.decode(ids) == _hf_decode(hf, ids)
    assert tok.encode(tok.piece(tok.eos_id)) == [tok.eos_id]


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_special_ids_come_from_the_checkpoint(model_dirs, variant):
    tok = PretrainedTokenizer.from_model_dir(model_dirs[variant])
    hf = _reference(model_dirs[variant])
    bos, eos, pad = EXPECTED[variant]
    assert (tok.piece(tok.bos_id), tok.piece(tok.eos_id), tok.piece(tok.pad_id)) == (bos, eos, pad)
    assert tok.eos_id == hf.eos_token_id
    if hf.bos_token_id is not None:
        assert tok.bos_id == hf.bos_token_id
    assert tok.pad_id not in (tok.eos_id, tok.bos_id) and 0 <= tok.pad_id < tok.vocab_size
    assert tok.vocab_size == len(hf)  # the vocabulary as it is: no row added for the pad


def test_no_bos_and_no_config_json_uses_eos(model_dirs, tmp_path):
    shutil.copytree(model_dirs["qwen2.5"], tmp_path / "q")
    (tmp_path / "q" / "config.json").unlink()
    tok = PretrainedTokenizer.from_model_dir(tmp_path / "q")
    assert tok.bos_id == tok.eos_id == tok.encode("<|endoftext|>")[0]


def test_split_special_tokens_is_honoured(model_dirs, tmp_path):
    out = shutil.copytree(model_dirs["llama3"], tmp_path / "split")
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "split_special_tokens": True}))
    tok, hf = PretrainedTokenizer.from_model_dir(out), _reference(out)
    text = special_texts(tok)[0]
    assert tok.encode(text) == _ids(hf, text) and tok.bos_id not in tok.encode(text)


def test_legacy_llama2_file_encodes_as_sentencepiece(model_dirs, llama2_model, tmp_path):
    """Llama 2 / TinyLlama ship the older tokenizer.json (a Prepend("▁") normalizer, no
    pre-tokenizer). transformers 5 rebuilds its pipeline (differing on a leading space); the
    file itself, which we follow, encodes as the sentencepiece model the weights learnt."""
    out = shutil.copytree(model_dirs["llama2"], tmp_path / "legacy")
    data = json.loads((out / "tokenizer.json").read_text())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(data))
    tok = PretrainedTokenizer.from_model_dir(out)
    sp = spm.SentencePieceProcessor(model_file=str(llama2_model))
    for text in real_texts() + ["  two leading spaces", " one"]:
        assert tok.encode(text) == sp.encode(text), text[:60]
        assert tok.decode(tok.encode(text)) == text


# -- save, load, identity, export -----------------------------------------------------------
@pytest.mark.parametrize("variant", ["llama3", "qwen2.5", "llama2"])
def test_save_load_and_export_keep_the_files(model_dirs, tmp_path, variant):
    src = model_dirs[variant]
    tok = PretrainedTokenizer.from_model_dir(src)
    tok.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert meta["kind"] == "hf" and meta["sha256"] == tok.identity()["sha256"]
    names = sorted(p.name for p in src.iterdir() if p.name != "config.json")
    assert sorted(p.name for p in (tmp_path / "saved" / "hf").iterdir()) == names
    for name in names:  # byte for byte
        assert (tmp_path / "saved" / "hf" / name).read_bytes() == (src / name).read_bytes()
    for back in (load_tokenizer(tmp_path / "saved"), build_tokenizer("hf", tmp_path / "saved")):
        assert back.identity() == tok.identity()
        assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    again = pickle.loads(pickle.dumps(load_tokenizer(tmp_path / "saved")))  # as data workers
    texts = real_texts()[:5] + special_texts(tok)
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    # a raw model directory reads the same through load_tokenizer (`mtp data build`)
    assert load_tokenizer(src).identity() == tok.identity()

    save_hf_tokenizer(load_tokenizer(tmp_path / "saved"), tmp_path / "export")
    for name in names:
        assert (tmp_path / "export" / name).read_bytes() == (src / name).read_bytes()
    hf = _reference(tmp_path / "export")
    assert [_ids(hf, t) for t in texts] == [tok.encode(t) for t in texts]


def test_a_replaced_file_is_detected(model_dirs, tmp_path):
    PretrainedTokenizer.from_model_dir(model_dirs["llama3"]).save(tmp_path)
    shutil.copy(model_dirs["llama3.0"] / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="sha256 differs"):
        load_tokenizer(tmp_path)


# -- errors ---------------------------------------------------------------------------------
def test_errors_are_one_line(model_dirs, bpe_json, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json") as err:
        build_tokenizer("hf", tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(TokenizerError, match="needs a directory"):
        build_tokenizer("hf", None)
    only_bos_eos = _llama3(bpe_json, tmp_path / "bare", LLAMA3_SPECIALS[:2])
    with pytest.raises(TokenizerError, match="no token can serve as PAD") as err:
        PretrainedTokenizer.from_model_dir(only_bos_eos)
    assert "\n" not in str(err.value)
    broken = shutil.copytree(model_dirs["llama3"], tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nope"}}')
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizers file") as err:
        load_tokenizer(broken)
    assert "\n" not in str(err.value)


# -- the whole system: `mtp data build` and `mtp train` with data.tokenizer=hf ----------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted((STDLIB / "json").glob("*.py")):
        (root / path.name).write_bytes(path.read_bytes())
    return root


TINY = [
    "data.tokenizer=hf",
    "data.seq_len=32",
    "data.val_fraction=0.2",
    "model.d_model=32",
    "model.n_layers=3",
    "model.n_attn_heads=2",
    "model.n_future=2",
    "model.max_seq_len=64",
    "train.max_steps=2",
    "train.micro_batch_size=4",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.ckpt_every=2",
    "tracking.enabled=false",
]


def test_train_with_the_checkpoint_tokenizer(model_dirs, corpus, tmp_path, capsys):
    src = model_dirs["llama3"]
    tok = PretrainedTokenizer.from_model_dir(src)
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"data.source={corpus}", f"data.tokenizer_path={src}", *TINY]
    assert main(["train", str(RECIPE), *args]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))
    assert load_tokenizer(ckpt / "tokenizer").identity() == tok.identity()
    from mtp_dist.config import load_config

    cfg = load_config(ckpt / "config.yaml")
    assert cfg.data.tokenizer == "hf"
    assert cfg.model.vocab_size == padded_vocab(tok.vocab_size) >= tok.vocab_size
    assert cfg.model.pad_id == tok.pad_id
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["special_ids"] == {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}


def test_data_build_reads_a_model_directory(model_dirs, corpus, tmp_path, capsys):
    src = model_dirs["qwen2.5"]
    out = tmp_path / "shards"
    argv = ["data", "build", str(corpus), "--out", str(out), "--tokenizer", str(src)]
    assert main([*argv, "--seq-len", "32", "--n-future", "2", "--workers", "1", "--quiet"]) == 0
    tok = PretrainedTokenizer.from_model_dir(src)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["special_ids"] == {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "data.tokenizer=hf needs data.tokenizer_path"),
        (["data.tokenizer_path={empty}"], "no tokenizer.json"),
    ],
)
def test_train_errors_are_one_line(corpus, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.format(empty=tmp_path / "empty") for e in extra]
    args = [f"run_dir={tmp_path / 'run'}", f"data.source={corpus}", *TINY, *extra]
    assert main(["train", str(RECIPE), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
