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


def save_glm_model(out: Path, *, vocab: int, mtp_layers: int = 2, real_moe: bool = False) -> None:
    """A chained model in GLM-4.5's layout as another trainer would leave it: transformers'
    Glm4MoeForCausalLM (3 layers, d 32, GQA, q/k/v biases; layer 0 dense, layers 1.. MoE) saved
    by save_pretrained, plus `mtp_layers` MTP layers made by transformers' own MtpModel and
    written under model.layers.{3 + k}.* (save_pretrained drops them). MoE layers are exactly
    dense (zero routed experts and router) unless `real_moe`. Random non-unit norm gains and
    random biases, so that a misplaced tensor shows."""
    from safetensors.torch import load_file, save_file
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM
    from transformers.modeling_layers import MtpModel

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    config = Glm4MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True,
        moe_intermediate_size=16, n_shared_experts=4, n_routed_experts=2,
        num_experts_per_tok=1, first_k_dense_replace=1, max_position_embeddings=128,
        num_nextn_predict_layers=mtp_layers, partial_rotary_factor=1.0, rope_parameters=rope,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    main = Glm4MoeForCausalLM(config).eval()
    mtp = MtpModel(main, mtp_layers)
    with torch.no_grad():
        for name, param in [*main.named_parameters(), *mtp.layers.named_parameters()]:
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
            elif ".experts." in name or "mlp.gate." in name:  # routed experts, router
                if real_moe:
                    param.normal_(0.0, 0.1)
                else:
                    param.zero_()
        for module in [*main.modules(), *mtp.layers.modules()]:  # a buffer, not a parameter
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.zero_()
    main.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    for name, value in mtp.layers.state_dict().items():
        k, rest = name.split(".", 1)
        layer = f"model.layers.{3 + int(k)}."
        rest = rest.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        if rest == "mlp.experts.gate_up_proj":  # (E, 2I, H), stored per expert in the layout
            for e, w in enumerate(value):
                gate, up = w.chunk(2, dim=0)
                tensors[f"{layer}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
                tensors[f"{layer}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
        elif rest == "mlp.experts.down_proj":
            for e, w in enumerate(value):
                tensors[f"{layer}mlp.experts.{e}.down_proj.weight"] = w.contiguous()
        else:
            tensors[layer + rest] = value.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
