"""Inference: KV-cached batched decoding, sampling, stop rules and self-speculative decoding.

    Decoder(model).run(prompt_ids, max_new_tokens=64, speculative=True)   # token ids in/out
    Generator(model, tokenizer).generate(["def f():"], GenerationConfig())  # text in/out

Design note: docs/speculative_decoding.md.
"""

from .decode import Decoder, DecodeResult, DecodeStats
from .generate import Completion, GenerationConfig, Generator
from .kv_cache import CacheState, LayerCache, ModelCache
from .sampling import Stopper, sample

__all__ = [
    "CacheState",
    "Completion",
    "DecodeResult",
    "DecodeStats",
    "Decoder",
    "GenerationConfig",
    "Generator",
    "LayerCache",
    "ModelCache",
    "Stopper",
    "sample",
]
