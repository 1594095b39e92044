"""Hugging Face checkpoints written by transformers itself, for the import tests: random weights
(`save_pretrained`) of each supported architecture and option, with a tokenizer of the kind the
real models ship (byte-level BPE like Llama 3 / SmolLM2 / Qwen2, or a sentencepiece model
converted like Llama 2's / TinyLlama's). Small enough to build in about a second each."""

from __future__ import annotations

from pathlib import Path

import torch
from toy_models import STDLIB

# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "colorsys.py"]


def corpus_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CORPUS]


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_bpe_tokenizer(out: Path, *, style: str = "llama3", vocab: int = 700) -> None:
    """A byte-level BPE laid out like Llama 3's (its split regex, <|begin_of_text|> /
    <|end_of_text|>, reserved special tokens, no pad) or, `style="qwen2"`, like Qwen2.5's
    (single-digit split, NFC, no BOS, <|endoftext|> as EOS and as pad)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    if style == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        specials += [f"<|reserved_special_token_{i}|>" for i in range(3)]
        names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    else:
        tok.normalizer = normalizers.NFC()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]
        names = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(out)


def sentencepiece_tokenizer(out: Path, work: Path) -> None:
    """A sentencepiece BPE made like Llama 2's (dummy prefix, byte fallback, no PAD), converted
    to a tokenizer.json by transformers' own sentencepiece converter (byte-fallback BPE, "▁"
    metaspace), the kind TinyLlama ships."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    lines = [line for text in corpus_texts() for line in text.split("\n")]
    prefix = work / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(f"{prefix}.model").read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **names).save_pretrained(out)


def tokenizer_size(out: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


ARCH = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def save_model(out: Path, arch: str, *, vocab: int, shard: str | None = None, **options) -> None:
    """A random `arch` model (4 layers, d 64) saved by transformers into `out`, float32.
    Biases (Qwen2) get random values too: transformers initialises them to zero, which would
    hide a bias that is dropped or misplaced."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in ARCH[arch])
    settings = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    settings.update(options)
    config = config_cls(**settings)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:  # non-unit gains, so a missing or swapped norm shows
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
