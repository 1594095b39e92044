"""Our tokenizers as Hugging Face tokenizers: `save_hf_tokenizer(tok, dir)` writes a directory that
`transformers.AutoTokenizer.from_pretrained(dir)` loads and that encodes every text to the same
ids as `tok.encode` (tests/test_interop.py checks it on standard-library files).

- bytes: a `tokenizers` BPE with the 256 byte symbols (GPT-2's byte-to-unicode alphabet, so a
  byte-level pre-tokenizer maps each byte to one symbol) at ids 0..255, no merges and no regex
  split, so every byte is one token; <s>, </s>, <pad> follow at 256..258.
- sentencepiece: transformers' own spm -> `tokenizers` conversion
  (`SpmConverter.build_tokenizer_from_spm_proto`), which follows the model's normaliser spec
  (our add_dummy_prefix=False, identity normalisation, byte fallback) and keeps user-defined
  pieces (our "\\n") whole. legacy=False: a dummy prefix, where a model has one (Llama-2's), only
  starts the text, as in `SentencePieceProcessor.encode`.

Special tokens written literally in a text ("<s>" inside a string of code) stay text, as they do
for our tokenizers: `split_special_tokens=True`.

- hf (a checkpoint's own tokenizer, `PretrainedTokenizer`): its files as imported, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from .base import Tokenizer, TokenizerError

SPECIALS = ("<s>", "</s>", "<pad>")


def _byte_backend():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character ByteLevel maps it to
    backend = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return backend


def _spm_backend(model_file: Path):
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)


def save_hf_tokenizer(tokenizer: Tokenizer, out: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (and the spm model, for reference) to `out`."""
    if tokenizer.kind == "hf":  # the checkpoint's own files, unchanged
        tokenizer.write_hf_files(out)
        return
    import tempfile

    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.kind == "bytes":
        backend = _byte_backend()
        names = dict(zip(("bos_token", "eos_token", "pad_token"), SPECIALS))
    elif tokenizer.kind == "sentencepiece":
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            backend = _spm_backend(Path(tmp) / "tokenizer.model")
            (out / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())
        names = {
            "bos_token": tokenizer.piece(tokenizer.bos_id),
            "eos_token": tokenizer.piece(tokenizer.eos_id),
            "pad_token": tokenizer.piece(tokenizer.pad_id),
            "unk_token": tokenizer.piece(tokenizer.unk_id),
        }
    else:
        raise TokenizerError(f"no Hugging Face form for tokenizer kind {tokenizer.kind!r}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **names,
    )
    fast.save_pretrained(out)
