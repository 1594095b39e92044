"""Choosing the next token (greedy, temperature, top-p) and deciding when a sequence ends.

`Stopper` watches one sequence's generated tokens, one token at a time, and says when it is
finished: the EOS token, or a stop string appearing in the generated text. Plain and speculative
decoding feed it the same token stream token by token, so they stop at the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NEG_INF = float("-inf")


def mask_vocab(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """Forbid ids >= vocab_limit (the model's padded embedding rows no tokenizer knows)."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    logits = logits.clone()
    logits[..., vocab_limit:] = NEG_INF
    return logits


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature == 0, else softmax(l / T)
    restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is < top_p: the top token always survives.
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def completion_text(decode: Callable[[list[int]], str], context: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context`.

    Decoding ids on their own can lose what depends on the tokens before them (sentencepiece
    drops the leading space of a first piece; a byte tokenizer may start mid-character), so
    decode context + ids and strip the context's text when it is a prefix."""
    if not context:
        return decode(ids)
    before = decode(context)
    full = decode(context + ids)
    return full[len(before) :] if full.startswith(before) else decode(ids)


class Stopper:
    """Finish rule for one sequence: EOS and/or stop strings in the generated text.

    `push(token)` is called for every generated token in order and returns the finish reason
    ("eos" or "stop") or None. To stay cheap per token it decodes only a tail window wide enough
    to hold any stop string (4 tokens per character covers byte-level UTF-8)."""

    CONTEXT = 16  # prompt tokens kept to decode the start of the completion correctly

    def __init__(
        self,
        *,
        eos_id: int | None = None,
        stop: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        prompt: Sequence[int] = (),
    ) -> None:
        if stop and decode is None:
            raise ValueError("stop strings need a decode function (a tokenizer)")
        self.eos_id = eos_id
        self.stop = tuple(s for s in stop if s)
        self.decode = decode
        self.context = list(prompt[-self.CONTEXT :])
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 8
        self.tokens: list[int] = []

    def push(self, token: int) -> str | None:
        self.tokens.append(token)
        if self.eos_id is not None and token == self.eos_id:
            return "eos"
        if self.stop:
            tail = self.tokens[-self.window :]
            before = (self.context + self.tokens[: -self.window])[-self.CONTEXT :]
            text = completion_text(self.decode, before, tail)
            if any(s in text for s in self.stop):
                return "stop"
        return None

    def text(self, tokens: list[int]) -> str:
        """The completion text of `tokens`, cut before the first stop string."""
        text = completion_text(self.decode, self.context, tokens)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text
