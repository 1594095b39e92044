"""A compiled plain decoding step with static shapes (the way gpt-fast decodes).

Decoding a small model eagerly is mostly per-operation dispatch (fused.py). `torch.compile`
(inductor: C++ on a CPU, CUDA graphs with mode="reduce-overhead" on a GPU) turns the step into a
few fused kernels, but only for shapes it has seen, so this step keeps them fixed:

- every layer's KV cache is preallocated at the model's whole context (B, G, max_seq_len, hd);
  a step of T tokens writes its keys/values at their positions (an index_put in the graph);
- attention reads the whole cache with a mask built in the graph from the positions (key s is
  visible to the token at position p iff s <= p): no length-dependent slice;
- the block width is fixed (T = 1: plain decoding) and the unembedding and the vocabulary mask
  are in the graph.

The batch dimension shrinks as sequences finish (decode.py drops them): the first compile is
for the starting batch size and torch.compile's automatic dynamic shapes recompile once, for
any batch size, when it changes. Prefills (T = prompt length) run the same function eagerly.

`StaticStep` computes what `FusedBlock`s compute (the same weights, stacked the same way) with
the rotary embedding in real arithmetic (the complex multiplication's four products and two
sums; inductor does not compile complex tensors), so tokens equal the eager path's up to
floating-point roundoff between the two (exactly equal in the float64 tests; tests compare
them token for token). The compile time is reported (`compile_seconds`); inductor's FX graph
cache (TORCHINDUCTOR_CACHE_DIR, default under /tmp) keeps the compiled code for later
processes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .fused import rms_norm
from .sampling import mask_vocab


class CompileError(RuntimeError):
    """torch.compile could not build the step here (no C++ compiler for inductor, ...)."""


class StaticStep:
    """The trunk, head 1 and the unembedding of a Decoder as one static-shape function,
    compiled for T = 1 (`step`), eager for prefills (`prefill`)."""

    def __init__(self, dec) -> None:
        if not dec.fused:
            raise ValueError("the compiled step runs the fused layers: Decoder(fused=True)")
        self.blocks = [*dec.blocks, dec.head1]
        self.n_trunk = len(dec.blocks)
        self.unembed = dec.unembed
        self.embedding = dec.embedding
        self.vocab_limit = dec.vocab_limit
        self.capacity = dec.max_len
        model = dec.model
        real = torch.float64 if model.rope_cos.dtype == torch.float64 else torch.float32
        self.cos, self.sin = model.rope_cos.to(real), model.rope_sin.to(real)  # (max_len, hd/2)
        self.device = self.embedding.device
        self.compile_seconds = 0.0
        self._compiled = None

    # -- the function ----------------------------------------------------------------------
    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, keys: list, values: list, last: torch.Tensor
    ) -> torch.Tensor:
        """ids, pos (B, T); caches (B, G, capacity, hd) per layer (written in place); `last`
        (B,) the column whose logits are wanted -> logits (B, V)."""
        B, T = ids.shape
        x = F.embedding(ids, self.embedding)  # (B, T, d)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (B, T, 1, hd/2)
        slots = torch.arange(self.capacity, device=ids.device)
        hidden = slots[None, None, None, :] > pos[:, None, :, None]  # (B, 1, T, capacity)
        mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(hidden, float("-inf"))
        rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
        for blk, k_cache, v_cache in zip(self.blocks, keys, values):
            x = self._block(blk, x, cos, sin, k_cache, v_cache, rows, pos, mask)
        z = x[rows[:, 0], last]  # (B, d)
        return mask_vocab(self.unembed(z), self.vocab_limit)

    @staticmethod
    def _block(blk, x, cos, sin, k_cache, v_cache, rows, pos, mask):
        B, T, d = x.shape
        hd, H, G = blk.head_dim, blk.n_heads, blk.n_kv_heads
        x = x.reshape(B * T, d)
        xn = rms_norm(x, blk.attn_gain, blk.eps)
        qkv = xn @ blk.wqkv if blk.bqkv is None else torch.addmm(blk.bqkv, xn, blk.wqkv)
        qkv = qkv.view(B, T, H + 2 * G, hd)
        pairs = qkv[:, :, : H + G].unflatten(-1, (-1, 2)).to(cos.dtype)  # pair-ordered
        a, b = pairs[..., 0], pairs[..., 1]
        qk = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        qk = qk.to(x.dtype)  # (B, T, H + G, hd)
        # Advanced indices on dims 0 and 2 around a slice: the indexed view is (B, T, G, hd).
        k_cache[rows, :, pos] = qk[:, :, H:]
        v_cache[rows, :, pos] = qkv[:, :, H + G :]
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=G != H)
        x = torch.addmm(x, y.transpose(1, 2).reshape(B * T, H * hd), blk.wo)
        gate_up = rms_norm(x, blk.mlp_gain, blk.eps) @ blk.w_gate_up
        f = blk.ffn
        x = torch.addmm(x, F.silu(gate_up[:, :f]) * gate_up[:, f:], blk.w_down)
        return x.view(B, T, d)

    # -- caches and calls ------------------------------------------------------------------
    def new_caches(self, batch: int) -> tuple[list, list]:
        """Zeroed (keys, values): per layer (batch, G, capacity, hd) in the weights' dtype."""
        shape = lambda blk: (batch, blk.n_kv_heads, self.capacity, blk.head_dim)
        dtype = self.embedding.dtype
        new = lambda blk: torch.zeros(shape(blk), dtype=dtype, device=self.device)
        return [new(b) for b in self.blocks], [new(b) for b in self.blocks]

    def compile(self) -> float:
        """Compile the T = 1 step and run it once (so that a failure shows here, not mid-run);
        returns the seconds that took. Raises CompileError where inductor cannot compile."""
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        fn = torch.compile(self.forward, mode="reduce-overhead" if cuda else None)
        keys, values = self.new_caches(1)
        ids, pos, last = (torch.zeros(1, 1, dtype=torch.long, device=self.device) for _ in "ipl")
        try:
            fn(ids, pos, keys, values, last[:, 0])
        except Exception as err:  # inductor raises many kinds (no compiler, codegen, ...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CompileError(first[:200]) from err
        self._compiled = fn
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def step(self, ids: torch.Tensor, pos: torch.Tensor, keys: list, values: list):
        """One plain step: ids, pos (B,) -> logits (B, V) (compiled)."""
        zero = torch.zeros_like(ids)
        return self._compiled(ids[:, None], pos[:, None], keys, values, zero)


def compiled_faster(dec, prompts: list, repeats: int = 12) -> bool:
    """Whether a plain step of the compiled decoder `dec` at this batch size runs faster than
    its eager step: both timed on throwaway runs of these prompts, interleaved, best of
    `repeats` (one untimed step each first). Measured because it is not always so: attention
    over the whole static cache costs more as rows grow, and the default model's compiled step
    at batch 8 ran at 0.84x the eager one on the CPU of docs/benchmarks.md ("Decoding on this
    machine"), 1.29x at batch 1."""
    from .decode import _Run

    argmax = lambda logits: logits.argmax(dim=-1)  # noqa: E731
    half = dec.max_len // 2  # prompts cut to half the context: room for the steps taken here
    prompts = [list(p)[-half:] for p in prompts]
    runs = {kind: _Run(dec, prompts, repeats + 1, 0, None, static=kind) for kind in (0, 1)}
    best = {0: float("inf"), 1: float("inf")}
    with torch.inference_mode():
        for run in runs.values():
            run.prefill(argmax)
        for rep in range(repeats + 1):
            for kind, run in runs.items():
                if not run.active:
                    return best[1] < best[0]
                start = time.perf_counter()
                run.plain_step(argmax)
                if rep:
                    best[kind] = min(best[kind], time.perf_counter() - start)
    return best[1] < best[0]


COMPILE_PAYS_TOKENS = 100_000
"""--compile auto compiles where a command decodes at least this many tokens. Measured on a
loaded 2-core AMD EPYC (docs/benchmarks.md, "Decoding on this machine"): compiling the default
model's step took 37 s cold and 7.5 s with inductor's cache warm, and saved up to ~0.5 ms of
~2.5 ms a token; 100,000 tokens pay back a cold compile at a fifth of that saving."""


def want_compile(choice: str, tokens: int) -> str:
    """The Decoder's `compile` for --compile auto|on|off in a command that will decode about
    `tokens` tokens: "on", "off", or "auto" (compiled, used at batch sizes where it is
    faster) where --compile auto and enough tokens."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {choice!r}")
    if choice == "auto":
        return "auto" if tokens >= COMPILE_PAYS_TOKENS else "off"
    return choice
