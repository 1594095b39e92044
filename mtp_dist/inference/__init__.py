"""Inference: KV-cached batched decoding, sampling, stop rules and self-speculative decoding.

    Decoder(model).run(prompt_ids, max_new_tokens=64, speculative=True)   # token ids in/out
    Generator(model, tokenizer).generate(["def f():"], GenerationConfig())  # text in/out

Design note: docs/speculative_decoding.md. Names are imported on first use, so that
`mtp --help` (which imports the cli submodule) does not pay for importing torch.
"""

from ..lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
