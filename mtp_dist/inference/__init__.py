"""Inference: KV-cached batched decoding, sampling, stop rules and self-speculative decoding.

    Decoder(model).run(prompt_ids, max_new_tokens=64, speculative=True)   # token ids in/out
    Generator(model, tokenizer).generate(["def f():"], GenerationConfig())  # text in/out

Design note: docs/speculative_decoding.md. Names are imported on first use, so that
`mtp --help` (which imports the cli submodule) does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "CacheState": "kv_cache",
    "LayerCache": "kv_cache",
    "ModelCache": "kv_cache",
    "DecodeResult": "decode",
    "DecodeStats": "decode",
    "Decoder": "decode",
    "Completion": "generate",
    "GenerationConfig": "generate",
    "Generator": "generate",
    "Stopper": "sampling",
    "sample": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
