"""Text in, text out: prompts are tokenized, batched by length, decoded and cut at stop strings.

    gen = Generator(model, tokenizer)
    completions, stats = gen.generate(["def fib(n):"], GenerationConfig(max_tokens=64,
                                      stop=("\\ndef",), speculative=True))

Training data is a stream of documents each followed by EOS (data_pipeline), so a prompt is
encoded as [EOS] + tokens: the model sees it as the start of a new document. The prompt and
max_tokens share the model's context (model.max_seq_len): a prompt longer than its share keeps
its end (the part next to what is generated), and its Completion says how many tokens went.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import MTPModel
from .decode import Decoder, DecodeStats
from .precision import for_decoding
from .sampling import Stopper


@dataclass(kw_only=True)
class GenerationConfig:
    max_tokens: int = 128
    """Most tokens generated per prompt."""
    temperature: float = 0.0
    """0 is greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    stop: tuple[str, ...] = ()
    """Generation ends when any of these appears in the generated text (which is cut before it)."""
    stop_at_eos: bool = True
    """End at the EOS token."""
    speculative: bool = False
    """Greedy self-speculative decoding with the model's extra heads (same output as greedy)."""
    n_draft: int | str | None = "auto"
    """Draft heads used by speculative decoding: a number, None for all (n_future - 1), or
    "auto": as many as pay by the step costs measured on this machine and the measured
    acceptance, possibly none (auto.py)."""
    batch_size: int = 8
    """Prompts decoded together."""
    seed: int = 0
    """Seed of the sampling generator."""


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    """'eos', 'stop' or 'length'."""
    prompt_tokens: int
    prompt_dropped: int = 0
    """Prompt tokens cut from its start to leave max_tokens room in the context."""


class Generator:
    """A model and its tokenizer, ready to complete prompts."""

    def __init__(
        self,
        model: MTPModel,
        tokenizer,
        *,
        prefix_eos: bool = True,
        dtype: str | None = None,
        compile: bool | str = False,
    ) -> None:
        """`dtype`: "auto", "fp32" or "bf16" casts the model's parameters for decoding
        (precision.py; `dtype_warning` then says if bf16 will be slow here); None keeps them.
        `compile`: plain steps compiled (Decoder's `compile`: True/"on", "auto", False/"off";
        raises CompileError where they cannot be)."""
        self.dtype_warning = None
        if dtype is not None:
            model, self.dtype_warning = for_decoding(model, dtype, model.rope_cos.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefix_eos = prefix_eos
        self.decoder = Decoder(model, vocab_limit=tokenizer.vocab_size, compile=compile)

    @property
    def max_new_tokens(self) -> int:
        """The most max_tokens can be: the context less one prompt token."""
        return self.model.cfg.max_seq_len - 1

    def encode(self, prompt: str, max_tokens: int) -> tuple[list[int], int]:
        """(prompt ids left-truncated so that max_tokens more fit in the context, how many
        prompt tokens were cut)."""
        tokens = self.tokenizer.encode(prompt)
        ids = ([self.tokenizer.eos_id] if self.prefix_eos else []) + tokens
        room = self.model.cfg.max_seq_len - max_tokens
        return ids[-room:], max(0, len(tokens) - room)

    def generate(
        self, prompts: Sequence[str], config: GenerationConfig | None = None
    ) -> tuple[list[Completion], DecodeStats]:
        cfg = config or GenerationConfig()
        if not 1 <= cfg.max_tokens <= self.max_new_tokens:
            raise ValueError(
                f"max_tokens must be in [1, {self.max_new_tokens}] for model.max_seq_len="
                f"{self.model.cfg.max_seq_len}, got {cfg.max_tokens}"
            )
        pairs = [self.encode(p, cfg.max_tokens) for p in prompts]
        encoded, dropped = [ids for ids, _ in pairs], [n for _, n in pairs]
        generator = torch.Generator(device=self.model.rope_cos.device).manual_seed(cfg.seed)
        eos = self.tokenizer.eos_id if cfg.stop_at_eos else None
        # Similar lengths together: less padding in the prefill, and sequences that finish
        # together leave the batch together.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        stats = DecodeStats()
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start : start + cfg.batch_size]
            stoppers = [
                Stopper(eos_id=eos, stop=cfg.stop, decode=self.tokenizer.decode, prompt=encoded[i])
                for i in chunk
            ]
            out = self.decoder.run(
                [encoded[i] for i in chunk],
                max_new_tokens=cfg.max_tokens,
                speculative=cfg.speculative,
                n_draft=cfg.n_draft,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                generator=generator,
                stoppers=stoppers,
            )
            stats = stats.merge(out.stats)
            for i, stopper, toks, reason in zip(chunk, stoppers, out.tokens, out.finish_reasons):
                results[i] = Completion(
                    stopper.text(toks), toks, reason, len(encoded[i]), dropped[i]
                )
        return results, stats
