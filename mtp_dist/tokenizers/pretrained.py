"""A checkpoint's own Hugging Face tokenizer (kind "hf"): Llama 2/3, TinyLlama, SmolLM2, Mistral,
Qwen2.5, read from their `tokenizer.json` with the `tokenizers` library (no transformers).

    tok = PretrainedTokenizer.from_model_dir("Llama-3.2-1B")  # its tokenizer.json + config
    tok.save("run/tokenizer"); tok = load_tokenizer("run/tokenizer")

Encoding. `encode(text)` runs the file's own pipeline (normalizer, pre-tokenizer, BPE) with no
BOS/EOS and no padding or truncation, which is what
`AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)` gives. A special token
written literally in a text ("<|end_of_text|>" inside a string of code) becomes that token, as
AutoTokenizer does by default; a tokenizer_config.json with `split_special_tokens: true` keeps
it text, also as AutoTokenizer does. Known difference: transformers >= 5 rebuilds the pipeline of
LlamaTokenizer-class checkpoints from the vocabulary; for the older tokenizer.json files of
Llama 2 and TinyLlama (a Prepend("▁") normalizer) it then gives one "▁" fewer to a text that starts
with a space, and no "▁" after a literal special token. We follow the file, which there agrees
with sentencepiece, the tokenizer the model was trained with.

`decode(ids)` drops special tokens (skip_special_tokens=True) and ids beyond the vocabulary (a
model's padded embedding rows), and applies no clean-up of spaces (which would alter code).

Special ids, all from the checkpoint, never a new vocabulary entry:
- EOS: tokenizer_config.json's eos_token (a string or an AddedToken dict), else
  special_tokens_map.json's, else config.json's eos_token_id (its first, if a list).
- BOS: the same with bos_token / bos_token_id; a tokenizer without one (Qwen2.5) uses its EOS:
  BOS only names a document start, and our data puts EOS between documents and before prompts.
- PAD fills the tail of the last packed window and is a label the loss ignores (model.pad_id), so
  it must not be EOS or BOS, and ordinary text should never produce it. First that applies: the
  tokenizer's pad token; the unk token when the model has byte fallback (Llama 2, TinyLlama:
  `<unk>` is never produced from text); a special token named like a pad (Llama 3.1's
  `<|finetune_right_pad_id|>`, Qwen2.5's `<|vision_pad|>`); a reserved one
  (`<|reserved_special_token_N|>`); else the last other special token. A tokenizer with none of
  these is refused. Only a text that spells the chosen token literally produces it (see above).

Saved layout (`save(dir)`): dir/tokenizer.json is our metadata (kind "hf", sha256 of each file),
the checkpoint's files go byte for byte into dir/hf/, so HF's tokenizer.json never collides with
ours and `save_hf_tokenizer` can write them back unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .base import TOKENIZER_JSON, TokenizerError

HF_DIR = "hf"
"""Subdirectory of a saved tokenizer holding the checkpoint's own files."""
HF_TOKENIZER, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"
REQUIRED_FILES = (HF_TOKENIZER, HF_CONFIG)
OPTIONAL_FILES = ("special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
"""Carried along unchanged when present (for `mtp export hf`); encoding reads none of them."""
MODEL_CONFIG = "config.json"
MODEL_ID_KEYS = ("bos_token_id", "eos_token_id")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class PretrainedTokenizer:
    """A Hugging Face `tokenizer.json` behind the `Tokenizer` interface (see the module doc)."""

    kind = "hf"

    def __init__(self, files: dict[str, bytes], model_ids: dict | None = None, *, where: str = ""):
        """`files`: name -> bytes of the checkpoint's tokenizer files (REQUIRED_FILES and any
        OPTIONAL_FILES); `model_ids`: config.json's bos_token_id / eos_token_id, if any."""
        self._where = where or "tokenizer"
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise TokenizerError(f"{self._where}: no {' or '.join(missing)}")
        self._files = dict(files)
        self._model_ids = {k: v for k, v in (model_ids or {}).items() if k in MODEL_ID_KEYS}
        self._load()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, directory: str | Path) -> PretrainedTokenizer:
        """The tokenizer of a Hugging Face model directory (tokenizer.json,
        tokenizer_config.json, optionally special_tokens_map.json; config.json for ids)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: no such tokenizer directory")
        for name in REQUIRED_FILES:
            if not (directory / name).is_file():
                raise TokenizerError(
                    f"{directory}: no {name} (a Hugging Face tokenizer directory holds "
                    f"{' and '.join(REQUIRED_FILES)})"
                )
        files = {
            name: (directory / name).read_bytes()
            for name in REQUIRED_FILES + OPTIONAL_FILES
            if (directory / name).is_file()
        }
        model_ids = {}
        config_path = directory / MODEL_CONFIG
        if config_path.is_file():
            config = _parse_json(config_path.read_bytes(), str(config_path))
            model_ids = {k: config[k] for k in MODEL_ID_KEYS if config.get(k) is not None}
        return cls(files, model_ids, where=str(directory))

    @classmethod
    def load(cls, directory: str | Path, meta: dict) -> PretrainedTokenizer:
        """Read what `save` wrote (`meta`: our tokenizer.json); a file that changed since is
        an error."""
        directory = Path(directory)
        meta_path = directory / TOKENIZER_JSON
        files = {}
        for name, sha in meta.get("files", {}).items():
            path = directory / meta.get("hf_dir", HF_DIR) / name
            if not path.is_file():
                raise TokenizerError(f"{path}: missing (listed in {meta_path})")
            files[name] = path.read_bytes()
            if _sha(files[name]) != sha:
                raise TokenizerError(
                    f"{path}: sha256 differs from {meta_path} (the file was replaced after saving)"
                )
        where = str(directory / meta.get("hf_dir", HF_DIR))
        return cls(files, meta.get("model_config"), where=where)

    def _load(self) -> None:
        from tokenizers import Tokenizer as Backend

        name = f"{self._where}/{HF_TOKENIZER}"
        try:
            backend = Backend.from_str(self._files[HF_TOKENIZER].decode("utf-8"))
        except Exception as err:  # noqa: BLE001 -- the library's parse errors have no common type
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TokenizerError(f"{name}: not a Hugging Face tokenizers file ({why})") from None
        # Some checkpoints bake padding or truncation into tokenizer.json; AutoTokenizer applies
        # neither unless asked, and neither must touch a document.
        backend.no_padding()
        backend.no_truncation()
        config = _parse_json(self._files[HF_CONFIG], f"{self._where}/{HF_CONFIG}")
        special_map = {}
        if "special_tokens_map.json" in self._files:
            special_map = _parse_json(
                self._files["special_tokens_map.json"], f"{self._where}/special_tokens_map.json"
            )
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._backend = backend
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.vocab_size = max(
            backend.get_vocab_size(with_added_tokens=True), 1 + max(added, default=-1)
        )

        def named(key: str) -> int | None:
            for source in (config, special_map):
                token = _token_name(source.get(key))
                if token is not None:
                    return backend.token_to_id(token)
            return None

        def model_id(key: str) -> int | None:
            value = self._model_ids.get(key)
            value = value[0] if isinstance(value, list) and value else value
            ok = isinstance(value, int) and 0 <= value < self.vocab_size
            return value if ok else None

        eos = named("eos_token")
        eos = eos if eos is not None else model_id("eos_token_id")
        if eos is None:
            raise TokenizerError(
                f"{self._where}: no EOS token ({HF_CONFIG} names no eos_token in the vocabulary "
                f"and there is no {MODEL_CONFIG} eos_token_id)"
            )
        bos = named("bos_token")
        bos = bos if bos is not None else model_id("bos_token_id")
        self.eos_id = eos
        self.bos_id = bos if bos is not None else eos  # no BOS (Qwen2.5): EOS separates
        self.unk_id = named("unk_token")
        self.pad_id = self._choose_pad(named("pad_token"), added)
        self._drop = {self.bos_id, self.eos_id, self.pad_id, self.unk_id} - {None}

    def _choose_pad(self, named_pad: int | None, added: dict) -> int:
        """The pad id by the rule in the module docstring (never a new vocabulary entry)."""
        taken = {self.bos_id, self.eos_id}
        if named_pad is not None and named_pad not in taken:
            return named_pad
        byte_fallback = bool(getattr(self._backend.model, "byte_fallback", False))
        if self.unk_id is not None and byte_fallback and self.unk_id not in taken:
            return self.unk_id
        # Without byte fallback an unk token is what unknown text becomes: never a pad.
        free = [
            (i, token.content)
            for i, token in sorted(added.items())
            if token.special and i not in taken and i != self.unk_id
        ]
        for word in ("pad", "reserved"):
            for i, content in free:
                if word in content.lower():
                    return i
        if free:
            return free[-1][0]  # the usual layouts put the unused ones last
        raise TokenizerError(
            f"{self._where}: no token can serve as PAD (no pad_token, no byte-fallback "
            "unk_token, no special token other than BOS/EOS); add a pad_token to "
            f"{HF_CONFIG} that names an existing special token"
        )

    # -- the Tokenizer interface -----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            # The library refuses a str with lone surrogates as a TypeError; the data builder
            # counts UnicodeEncodeError as "invalid_utf8", as for the other kinds.
            if isinstance(text, str):
                text.encode("utf-8")
            raise

    def decode(self, ids: list[int]) -> str:
        keep = [i for i in ids if 0 <= i < self.vocab_size and i not in self._drop]
        return self._backend.decode(keep, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        self.write_hf_files(out / HF_DIR)
        meta = {
            **self.identity(),
            "hf_dir": HF_DIR,
            "files": {name: _sha(data) for name, data in sorted(self._files.items())},
            "model_config": self._model_ids,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
        }
        (out / TOKENIZER_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    def identity(self) -> dict:
        # Every file's bytes and the config.json ids the specials may come from.
        h = hashlib.sha256()
        for name, data in sorted(self._files.items()):
            h.update(f"{name}\0{_sha(data)}\0".encode())
        h.update(json.dumps(self._model_ids, sort_keys=True).encode())
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": h.hexdigest()}

    # -- extras ----------------------------------------------------------------------------
    def write_hf_files(self, directory: str | Path) -> None:
        """The checkpoint's tokenizer files, byte for byte, into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (out / name).write_bytes(data)

    def piece(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (for inspection and tests)."""
        return self._backend.id_to_token(token_id)

    def __getstate__(self) -> dict:  # workers get the file bytes, not the Rust object
        return {"files": self._files, "model_ids": self._model_ids, "where": self._where}

    def __setstate__(self, state: dict) -> None:
        self._files, self._model_ids, self._where = (
            state["files"],
            state["model_ids"],
            state["where"],
        )
        self._load()

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self._where!r}, vocab_size={self.vocab_size})"


def _parse_json(data: bytes, name: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{name}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{name}: not a JSON object")
    return value
