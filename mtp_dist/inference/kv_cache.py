"""Padded, per-sequence KV caches for batched incremental decoding.

Every sequence b of a batch owns the cache slots 0 .. lengths[b]-1 of each layer's buffers; slot s
holds the key/value of the token at position s. A forward writes its T new tokens at slots
lengths[b] .. lengths[b]+T-1 and lets new token j see the slots s <= lengths[b] + j (its valid past
and the new tokens before it). `commit(accepted)` then advances lengths by a per-sequence count,
which is also the rollback of speculative decoding: slots past the new length hold stale
keys/values that the mask hides and the next forward overwrites.

One `CacheState` (the lengths) is shared by the caches of all layers — trunk and every head —
because after each decoding step they all hold the same tokens. Layers plug in through the
attention seam of mtp_dist/model/layers.py: `k_all, v_all, mask = cache.update(k, v)`.
"""

from __future__ import annotations

import torch


class CacheState:
    """Per-sequence valid lengths of a batch and the write slots/mask of the current forward."""

    def __init__(self, lengths: torch.Tensor, capacity: int) -> None:
        self.lengths = lengths.clone()  # (B,) long: valid cached tokens per sequence
        self.capacity = capacity
        self._prepared: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def slots(self, n_new: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(write slots (B, T), additive attention mask (B, 1, T, S) of `dtype`, S) for a
        forward of T new tokens: 0 where a token may attend, -inf where not (an additive float
        mask: scaled_dot_product_attention on a CPU ran ~1.7x faster with it than with a
        boolean one for one-token queries, which it converts on every call).

        Computed once per forward and width, then shared by every layer (cleared by commit)."""
        got = self._prepared.get(n_new)
        if got is None or got[1].dtype != dtype:
            steps = torch.arange(n_new, device=self.lengths.device)
            write = self.lengths[:, None] + steps  # (B, T)
            used = int(self.lengths.max()) + n_new  # the smallest prefix of slots any row needs
            if used > self.capacity:
                raise RuntimeError(f"KV cache full: need {used} slots, have {self.capacity}")
            keys = torch.arange(used, device=self.lengths.device)
            hidden = keys[None, None, :] > write[:, :, None]  # (B, T, S)
            mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
            got = (write, mask.masked_fill_(hidden, float("-inf"))[:, None], used)
            self._prepared[n_new] = got
        return got

    def commit(self, accepted: torch.Tensor | int) -> None:
        """Keep `accepted` (per sequence (B,) or for all) of the tokens just written."""
        self.lengths += accepted
        self._prepared.clear()

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the sequences at indices `keep` (B',): finished ones leave the batch."""
        self.lengths = self.lengths[keep]
        self._prepared.clear()


class LayerCache:
    """The key/value buffers of one attention layer: (B, H, capacity, head_dim) each."""

    def __init__(self, state: CacheState) -> None:
        self.state = state
        self.k: torch.Tensor | None = None  # allocated on first use (H and head_dim come from k)
        self.v: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, H, T, hd); return all keys, values (B, H, S, hd) and the mask."""
        B, H, T, hd = k.shape
        if self.k is None:
            shape = (B, H, self.state.capacity, hd)
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        write, mask, used = self.state.slots(T, k.dtype)
        index = write[:, None, :, None].expand(B, H, T, hd)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        return self.k[:, :, :used], self.v[:, :, :used], mask

    def select(self, keep: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k[keep]
            self.v = self.v[keep]

    def keep_heads(self, n: int) -> None:
        """Keep the first n attention heads (a drafter that dropped its last heads)."""
        if self.k is not None:
            self.k, self.v = self.k[:, :n], self.v[:, :n]


class ModelCache:
    """The caches of a whole MTP model: one per trunk layer and `n_heads` for the head side
    (head 1, and for speculative decoding one more for the fused draft heads)."""

    def __init__(self, n_trunk: int, n_heads: int, lengths: torch.Tensor, capacity: int) -> None:
        self.state = CacheState(lengths, capacity)
        self.trunk = [LayerCache(self.state) for _ in range(n_trunk)]
        self.heads = [LayerCache(self.state) for _ in range(n_heads)]

    @property
    def lengths(self) -> torch.Tensor:
        return self.state.lengths

    def commit(self, accepted: torch.Tensor | int) -> None:
        self.state.commit(accepted)

    def select(self, keep: torch.Tensor) -> None:
        self.state.select(keep)
        for cache in [*self.trunk, *self.heads]:
            cache.select(keep)
