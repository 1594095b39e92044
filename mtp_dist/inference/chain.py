"""Drafting with the chained family's modules (`model.mtp_arch=chained`): their KV caches.

Module k (1..n-1) is one transformer layer over a sequence of its own: at position t it reads
h^{k-1}_t (the previous depth's normed output) and E x_{t+k} (zero at position 0), and its
output predicts x_{t+k+1}. Decoding keeps, for every module, a KV cache holding exactly what a
full non-cached forward of the chain over the accepted tokens produces (as in training,
`ChainedHeads.forward`): module k's entry at position t needs x_{t+k}, so with tokens
x_0..x_N known (x_N the pending token, emitted but not yet fed) module k holds positions
0..N-k, and module 1 (x_{t+1}) positions 0..N-1, the same as the trunk.

Drafting then reads every module at position N-1, as the chain would run over the known tokens
followed by the drafts made so far: module 1 at N-1 reads x_N (known) and drafts q_{N+1};
module k reads module k-1's output there and E q_{N+k-1}, and attends over its cached prefix
plus its positions N-k+1..N-2, which read drafts. Those k-1 draft positions are computed in the
same call, written past the cache's kept length (so they are never kept) and replaced, by the
real entries or by new drafts, in the next step. So a module's draft is exactly
`ChainedHeads.depth_hidden` over the known tokens + the drafts before it (a test checks this).

Per step and module k that is one call over positions len_k .. N-1, where len_k is the kept
length before the step: the newly known positions (they are kept) and then the draft positions.
Each module's window starts one position before the previous module's (len_k = len_{k-1} - 1),
so the previous module's output at its last kept position is carried from step to step.

docs/speculative_decoding.md ("Chained models") compares this with the engines: vLLM 0.32's
CPU build drafts every position with module 1, and transformers' use_mtp does not zero the
embedding at position 0.
"""

from __future__ import annotations

import torch

from ..model.chain import ChainModule, zero_first_position
from .fused import FusedBlock, rms_norm
from .kv_cache import CacheState, LayerCache


class FusedChainModule:
    """A `ChainModule` with its layer as a `FusedBlock` (fused.py): the same arithmetic,
    `(h_prev (B, T, d), embedded (B, T, d), freqs (B, T, 1, hd/2) complex, cache) -> h^k`."""

    def __init__(self, module: ChainModule) -> None:
        w = lambda norm: norm.weight.detach()
        self.eps = module.eps
        self.enorm, self.hnorm, self.norm = w(module.enorm), w(module.hnorm), w(module.norm)
        self.eh_proj = module.eh_proj.weight.detach().t().contiguous()  # (2d, d)
        self.block = FusedBlock(module.block)

    def __call__(self, h_prev, embedded, freqs, cache) -> torch.Tensor:
        x = torch.cat(
            (rms_norm(embedded, self.enorm, self.eps), rms_norm(h_prev, self.hnorm, self.eps)),
            dim=-1,
        )
        return rms_norm(self.block(x @ self.eh_proj, freqs, cache), self.norm, self.eps)


class ChainDrafts:
    """The modules' state in one decoding run of a batch: per module a KV cache with its own
    lengths, and its output at its last kept position (read by the next module's window)."""

    def __init__(self, dec, batch: int, count: int, capacity: int) -> None:
        """`dec`: the Decoder (its modules, embedding, rotary factors and projection);
        `count`: modules used (n_draft)."""
        self.dec, self.count = dec, count
        device = dec.embedding.device
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        self.states = [CacheState(zeros, capacity) for _ in range(count)]
        self.caches = [LayerCache(s) for s in self.states]
        self.carry: list[torch.Tensor | None] = [None] * count
        self.last_hidden: list[torch.Tensor] = []
        """Each module's output at the position its draft was read, after the latest call
        (B, d) (what the tests compare with the uncached chain)."""

    def narrow(self, count: int) -> None:
        """Use only the first `count` modules from now on (their caches stay valid)."""
        self.count = count

    def select(self, keep: torch.Tensor) -> None:
        for state, cache in zip(self.states, self.caches):
            state.select(keep)
            cache.select(keep)
        self.carry = [None if c is None else c[keep] for c in self.carry]
        self.last_hidden = [h[keep] for h in self.last_hidden]

    def __call__(
        self,
        h0: torch.Tensor,
        block: torch.Tensor,
        accepted: torch.Tensor,
        pending: torch.Tensor,
        start: torch.Tensor,
    ) -> torch.Tensor:
        """Feed the modules the tokens that became known, draft, return drafts (B, count).

        `block` (B, W): the tokens the trunk just ran at positions start .. start+W-1 (the
        prefill: the right-padded prompts, start 0); `h0` (B, >= accepted+1, d): depth 0's
        normed output there; `accepted` (B,): block[:, 1..accepted] are now known (the
        prefill: prompt length - 1); `pending` (B,): the token after them. Then N = start +
        accepted + 1 tokens are fed and x_N = pending."""
        dec, B = self.dec, block.shape[0]
        rows = torch.arange(B, device=block.device)
        start = start.clone()  # the callers' cache lengths move on commit
        n = start + accepted + 1  # (B,) trunk length after this step
        # The known tokens after position `start` and then the drafts, as one stream:
        # stream[j] = x_{start+1+j}, so x_{t+k} for module k at position t is
        # stream[t + k - start - 1].
        width = block.shape[1]
        stream = torch.zeros(B, width + self.count, dtype=block.dtype, device=block.device)
        stream[:, : width - 1] = block[:, 1:]
        stream[rows, accepted] = pending
        drafts, self.last_hidden, carry = [], [], list(self.carry)
        prev, prev_start = h0, start  # the previous depth's window and its first position
        for k in range(1, self.count + 1):
            state, i = self.states[k - 1], k - 1
            first = state.lengths.clone()  # (B,) positions 0..first-1 are kept
            span = int((n - first).max())  # positions first .. N-1, padded to the longest
            j = torch.arange(span, device=block.device)
            positions = first[:, None] + j  # (B, span)
            # The previous depth's output at these positions: its window starts at
            # prev_start (>= first, by 0 or 1); one position before it is the carried one.
            if k == 1:
                h_prev = prev[:, :span]
            else:
                before = self.carry[i - 1]  # None until module k-1 has kept a position
                before = prev[:, 0] if before is None else before
                full = torch.cat((before[:, None], prev), dim=1)
                idx = (positions - prev_start[:, None] + 1).clamp(0, full.shape[1] - 1)
                h_prev = full[rows[:, None], idx]  # (B, span, d)
            tok_idx = (positions + k - start[:, None] - 1).clamp(0, stream.shape[1] - 1)
            embedded = zero_first_position(dec.embed(stream[rows[:, None], tok_idx]), positions)
            # Positions past the context end only occur in padding columns (never read).
            rot = dec.rotary(positions.clamp(max=dec.max_len - 1))
            out = dec.run_module(i, h_prev, embedded, rot, self.caches[i])  # (B, span, d)
            read = out[rows, n - 1 - first]  # (B, d): position N-1
            self.last_hidden.append(read)
            draft = dec.draft_logits(read).argmax(dim=-1)  # (B,)
            drafts.append(draft)
            stream[rows, accepted + k] = draft
            kept = (n - k + 1).clamp(min=0)  # module k holds positions 0..N-k
            if k < self.count:  # module k+1's next window starts at module k's last kept one
                carry[i] = out[rows, (kept - 1 - first).clamp(min=0)]
            state.commit(kept - first)
            prev, prev_start = out, first
        self.carry = carry  # only now: module k+1 read module k's previous one above
        return torch.stack(drafts, dim=1)
