"""The n output heads, the shared unembedding, and the sequential head-gradient loss.

`MultiTokenHeads` owns every parameter of the n head layers and of the shared final norm +
unembedding DIRECTLY (flattened names such as `head2__attn__wq__weight`), and runs them through
`torch.func.functional_call` on parameter-free "template" modules. Owning them directly is what
lets DeepSpeed ZeRO-3 gather them around this module's forward and backward
(docs/sequential_heads.md: with the parameters in submodules, ZeRO-3 hands the loss size-0
partitions).

Loss implementations (`loss_impl`):
- "naive": all heads in one autograd graph; every head's logits stay alive until backward.
- "sequential": `_SequentialHeadLoss`, a custom autograd Function whose forward runs head after
  head on a detached copy of the trunk output, calls `torch.autograd.grad` per head (so only one
  head's logits and logit-gradients exist at a time) and sums the gradients; its backward hands
  them out once. To the caller it is one loss and one backward call, and the trunk is
  backpropagated once, with no recomputation.

`loss_chunk` > 0 (either implementation): each head's final norm + unembedding + cross-entropy
runs in pieces of the sequence, forward and backward, through `_ChunkedProjectionLoss`, so no
head's (B, T, V) logits exist whole: at most one chunk's (about `loss_chunk` tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.func import functional_call

from .layers import IGNORE_INDEX
from .params import Owner, heads_member_name

TIED_WEIGHT = "tied_embedding"
"""The key under which the heads' weight dicts carry a tied unembedding (the embedding's
matrix, not a parameter of the heads)."""


class LossOutput(NamedTuple):
    """`loss` is the sum over heads of each head's mean cross-entropy (the one to backprop).
    Per-head tensors are detached, shape (n_local_heads,), in the order of `head_ids`.

    A NamedTuple (not a dataclass) so that DeepSpeed ZeRO-3 finds the loss tensor in the
    module's output and registers the hook that re-gathers the heads' parameters for backward.
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    head_correct: torch.Tensor
    head_counts: torch.Tensor
    head_ids: tuple[int, ...]
    head_weights: tuple[float, ...] | None = None
    """Each head's weight in `loss` (None: the plain sum, every weight 1)."""


def shift_labels(labels: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Targets of head offset+1 at `length` positions: labels[:, t + offset], IGNORE past the end.

    labels[:, j] is the token at position j + 1, so head i (1-based) at position t targets
    labels[:, t + i - 1]."""
    B = labels.shape[0]
    out = labels.new_full((B, length), IGNORE_INDEX)
    available = max(0, min(length, labels.shape[1] - offset))
    out[:, :available] = labels[:, offset : offset + available]
    return out


class HeadReduction(Protocol):
    """What heads held on different ranks share, summed over those ranks (head parallelism).
    In one process nothing is held elsewhere: `LocalHeads` is the identity."""

    def reduce_hidden_grad(self, grad_h: torch.Tensor) -> torch.Tensor:
        """Sum the trunk-output gradient over the ranks whose heads contributed."""

    def reduce_shared_grads(self, grads: list[torch.Tensor]) -> None:
        """Sum (in place) the shared final norm + unembedding gradients over those ranks."""


class LocalHeads:
    """Every head in this process: nothing to reduce."""

    def reduce_hidden_grad(self, grad_h: torch.Tensor) -> torch.Tensor:
        return grad_h

    def reduce_shared_grads(self, grads: list[torch.Tensor]) -> None:
        pass


class MultiTokenHeads(nn.Module):
    def __init__(
        self,
        blocks: dict[int, nn.Module],
        unembed: nn.Module,
        *,
        n_future: int,
        token_loss,
        loss_impl: str = "sequential",
        loss_chunk: int = 0,
        pad_id: int = -1,
        reduction: HeadReduction | None = None,
        tied_weight: nn.Parameter | None = None,
    ) -> None:
        """`blocks`: head index -> that head's layer, for the heads this module holds (all n,
        except under head parallelism); `unembed`: the shared final norm + unembedding. Their
        parameters are adopted under flat names; the modules become parameter-free templates.
        `loss_chunk`: tokens per cross-entropy chunk (0: each head's logits in one piece).
        `tied_weight`: the input embedding's matrix, when `unembed` is tied to it: used as the
        projection, but not registered here (it stays the embedding's one parameter)."""
        super().__init__()
        if not blocks:
            raise ValueError("MultiTokenHeads needs at least one head")
        self.n_future = n_future
        self.pad_id = pad_id
        self.loss_impl = loss_impl
        self.loss_chunk = loss_chunk
        self._token_loss = token_loss
        self.reduction: HeadReduction = reduction or LocalHeads()
        # Which heads this module runs (all n in one process, a subset per head-parallel rank).
        self.head_ids: tuple[int, ...] = tuple(sorted(blocks))
        # (template path, flat parameter name) per held head, and for the shared unembedding.
        self.head_param_names: dict[int, list[tuple[str, str]]] = {
            i: self._adopt(Owner("head", i), block) for i, block in sorted(blocks.items())
        }
        self.shared_param_names: list[tuple[str, str]] = self._adopt(Owner("unembed"), unembed)
        # Hidden from registration like the templates: state_dict and ZeRO see it once, as
        # the embedding's (the distributed engine registers it as an external parameter).
        object.__setattr__(self, "tied_weight", tied_weight)
        # Parameter-free templates, hidden from module registration (object.__setattr__), so
        # that .to(), state_dict() and ZeRO never see them; functional_call supplies weights.
        first = blocks[self.head_ids[0]]
        object.__setattr__(self, "_block_template", copy.deepcopy(first).to("meta"))
        object.__setattr__(self, "_unembed_template", copy.deepcopy(unembed).to("meta"))

    def _adopt(self, owner: Owner, module: nn.Module) -> list[tuple[str, str]]:
        names = []
        for path, param in module.named_parameters():
            flat = heads_member_name(owner, path)
            self.register_parameter(flat, param)
            names.append((path, flat))
        return names

    # -- running one head -------------------------------------------------------------------
    def _params(self, names: Iterable[tuple[str, str]], source: dict[str, torch.Tensor]):
        return {path: source[flat] for path, flat in names}

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor the heads compute with, by flat name: their own parameters and, when
        tied, the embedding's matrix under TIED_WEIGHT."""
        source = dict(self.named_parameters())
        if self.tied_weight is not None:
            source[TIED_WEIGHT] = self.tied_weight
        return source

    def shared_flat_names(self) -> list[str]:
        """Flat names of the shared final norm + unembedding tensors (TIED_WEIGHT included)."""
        names = [flat for _, flat in self.shared_param_names]
        return names + ([TIED_WEIGHT] if self.tied_weight is not None else [])

    def head_hidden(
        self,
        i: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Head i's transformer layer on the trunk output h (B, T, d) -> (B, T, d)."""
        source = params if params is not None else self.weights()
        weights = self._params(self.head_param_names[i], source)
        return functional_call(self._block_template, weights, (h, cos, sin, kv_cache))

    def project(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Shared final norm + unembedding: (B, T, d) -> (B, T, V[shard])."""
        source = params if params is not None else self.weights()
        weights = self._params(self.shared_param_names, source)
        args = (x,) if self.tied_weight is None else (x, source[TIED_WEIGHT])
        return functional_call(self._unembed_template, weights, args)

    def logits(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, i: int = 0):
        return self.project(self.head_hidden(i, h, cos, sin))

    def head_loss(self, i, h, labels, cos, sin, params=None):
        """(mean CE, #correct, #valid) of head i (0-based; predicts t + i + 1), in the caller's
        autograd graph (the naive loss, evaluation)."""
        z = self.head_hidden(i, h, cos, sin, params=params)  # (B, T, d)
        if self.loss_chunk > 0:
            return self._chunked_loss(i, z, labels, params)
        return self._whole_loss(i, z, labels, params)

    def _whole_loss(self, i, z, labels, params=None):
        logits = self.project(z, params)
        # (B, T) from the logits: under sequence parallelism h holds a slice of the sequence.
        B, T = logits.shape[:2]
        target = shift_labels(labels, i, T).reshape(-1)
        token_loss, correct = self._token_loss(logits.reshape(B * T, -1), target)
        count = (target != IGNORE_INDEX).sum()
        loss = token_loss.sum() / count.clamp(min=1)
        return loss, correct.sum(), count

    def _chunked_loss(self, i, z, labels, params=None):
        source = params if params is not None else self.weights()
        names = self.shared_flat_names()
        shared = [source[n] for n in names]
        if torch.is_grad_enabled() and (z.requires_grad or any(p.requires_grad for p in shared)):
            return _ChunkedProjectionLoss.apply(self, i, z, labels, names, *shared)
        with torch.no_grad():
            loss, correct, count, _ = chunked_cross_entropy(self, i, z, labels, source)
        return loss, correct, count

    def head_backward(self, i, h_leaf, labels, cos, sin, leaves: dict[str, torch.Tensor]):
        """Head i's (loss, #correct, #valid), its forward and backward at once: the gradient is
        accumulated into the `.grad` of `h_leaf` and of the `leaves` (detached parameters) it
        reaches, and head i's graph (logits included) is freed on return."""
        own = [leaves[flat] for _, flat in self.head_param_names[i]]
        shared = [leaves[flat] for flat in self.shared_flat_names()]
        inputs = [t for t in [h_leaf, *own] if t.requires_grad]
        if not inputs and not any(p.requires_grad for p in shared):
            # Nothing this head reaches trains (head 1 of a frozen next-token model): its loss
            # is measured, and no graph is built.
            with torch.no_grad():
                return self.head_loss(i, h_leaf, labels, cos, sin, params=leaves)
        z = self.head_hidden(i, h_leaf, cos, sin, params=leaves)  # (B, T, d)
        if self.loss_chunk > 0:  # the chunks accumulate the shared gradients themselves
            loss, correct, count, grad_z = chunked_cross_entropy(
                self, i, z, labels, leaves, backward=True
            )
            if inputs:
                torch.autograd.backward(z, grad_z, inputs=inputs)
        else:
            loss, correct, count = self._whole_loss(i, z, labels, leaves)
            torch.autograd.backward(loss, inputs=inputs + [p for p in shared if p.requires_grad])
        return loss.detach(), correct, count

    # -- the loss ---------------------------------------------------------------------------
    def forward(
        self, h: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> LossOutput:
        """Loss over heads for trunk output h (B, T, d) and next-token labels (B, >= T)."""
        if self.pad_id >= 0:  # packed shards pad the last window of a split
            labels = labels.masked_fill(labels == self.pad_id, IGNORE_INDEX)
        source = self.weights()
        trains = h.requires_grad or any(p.requires_grad for p in source.values())
        if self.loss_impl == "sequential" and torch.is_grad_enabled() and trains:
            names, params = list(source), list(source.values())
            total, losses, correct, counts = _SequentialHeadLoss.apply(
                self, names, h, labels, cos, sin, *params
            )
        else:
            per_head = [self.head_loss(i, h, labels, cos, sin) for i in self.head_ids]
            losses = torch.stack([loss for loss, _, _ in per_head])
            total = losses.sum()
            correct = torch.stack([c for _, c, _ in per_head])
            counts = torch.stack([n for _, _, n in per_head])
            losses = losses.detach()
        return LossOutput(total, losses, correct, counts, self.head_ids)


class _SequentialHeadLoss(torch.autograd.Function):
    """forward: each head's forward + backward in turn (`head_backward`), accumulating the
    gradients; backward: hand them out.

    Each parameter receives its gradient exactly once per backward: ZeRO-2 refuses a gradient
    reduced twice for one partition, and ZeRO-3 holds the full weights only during this module's
    forward and backward (docs/sequential_heads.md).
    The gradients are exact for a backward of the returned total with any scalar grad_output.
    """

    @staticmethod
    def forward(ctx, heads: MultiTokenHeads, names, h, labels, cos, sin, *params):
        with torch.enable_grad():
            # A frozen trunk (no gradient wanted for h) is not backpropagated into at all.
            h_leaf = h.detach().requires_grad_(h.requires_grad)
            leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in zip(names, params)}
            losses, corrects, counts = [], [], []
            for i in heads.head_ids:
                # Frees head i's graph (its logits and their gradient) before head i+1 runs.
                loss, correct, count = heads.head_backward(i, h_leaf, labels, cos, sin, leaves)
                losses.append(loss)
                corrects.append(correct)
                counts.append(count)
        grad_h = None
        if h.requires_grad:
            grad_h = h_leaf.grad if h_leaf.grad is not None else torch.zeros_like(h)
            grad_h = heads.reduction.reduce_hidden_grad(grad_h)
        shared = [leaves[flat].grad for flat in heads.shared_flat_names()]
        heads.reduction.reduce_shared_grads([g for g in shared if g is not None])
        ctx.grad_names = [n for n in names if leaves[n].grad is not None]
        ctx.param_slots = [names.index(n) for n in ctx.grad_names]
        ctx.n_params = len(names)
        ctx.has_grad_h = grad_h is not None
        saved = [leaves[n].grad for n in ctx.grad_names]
        ctx.save_for_backward(*([grad_h] if ctx.has_grad_h else []), *saved)
        losses, corrects, counts = torch.stack(losses), torch.stack(corrects), torch.stack(counts)
        ctx.mark_non_differentiable(losses, corrects, counts)
        return losses.sum(), losses, corrects, counts

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0).mul_(grad_total) if ctx.has_grad_h else None
        # Scaled in place: the buffers are this node's own, so the parameters receive them
        # without a second copy of every head and unembedding gradient (a second backward
        # through the graph fails on their version counter instead of reusing them).
        param_grads = [None] * ctx.n_params
        for slot, g in zip(ctx.param_slots, saved):
            param_grads[slot] = g.mul_(grad_total)
        return (None, None, grad_h, None, None, None, *param_grads)


def chunk_positions(chunk: int, batch: int, length: int) -> list[tuple[int, int]]:
    """[start, end) pieces of `length` positions holding about `chunk` tokens of a `batch`-row
    batch each (at least one position per piece)."""
    step = max(1, chunk // batch)
    return [(s, min(length, s + step)) for s in range(0, length, step)]


def chunked_cross_entropy(
    heads: MultiTokenHeads,
    i: int,
    z: torch.Tensor,
    labels,
    params,
    backward: bool = False,
    scale: float = 1.0,
):
    """Final norm + unembedding + CE of head i over z (B, t, d), in chunks of positions.

    Returns (mean loss, #correct, #valid, d mean / dz or None). With `backward`, each chunk's
    loss is backpropagated at once (scaled by `scale` / #valid) into a (B, t, d) buffer and into the
    `.grad` of the shared parameters in `params` that require it, and the chunk's logits are
    freed before the next chunk is projected.

    A projection may return more positions than it is given: under sequence parallelism z is
    this rank's 1/k of the sequence and the final norm all-gathers the chunk from every rank in
    rank order, so its k * (e - s) rows are positions r * t + [s, e) for r = 0..k-1. That rule
    is rank-independent, and with k = 1 it is the plain chunk.
    """
    B, t = z.shape[:2]
    shared = [params[flat] for flat in heads.shared_flat_names()]
    wanted = [p for p in shared if p.requires_grad] if backward else []
    grad_z = torch.empty_like(z) if backward else None
    loss_sum, correct, target, count, divisor = None, None, None, None, None
    for s, e in chunk_positions(heads.loss_chunk, B, t):
        piece = z.detach()[:, s:e].contiguous().requires_grad_(backward)  # (B, e - s, d)
        with torch.set_grad_enabled(backward):
            logits = heads.project(piece, params)  # (B, k * (e - s), V[shard])
            k = logits.shape[1] // (e - s)
            if target is None:  # every rank's positions: the chunks' targets come from here
                target = shift_labels(labels, i, k * t)  # (B, k * t)
                count = (target != IGNORE_INDEX).sum()
                divisor = count.clamp(min=1)  # an integer: dividing keeps each dtype's precision
            rows = (torch.arange(k)[:, None] * t + torch.arange(s, e)[None]).reshape(-1)
            token_loss, hit = heads._token_loss(
                logits.reshape(-1, logits.shape[-1]), target[:, rows.to(target.device)].reshape(-1)
            )
            piece_loss = token_loss.sum()
        if backward:
            torch.autograd.backward(piece_loss * scale / divisor, inputs=[piece] + wanted)
            grad_z[:, s:e] = piece.grad
        del logits, token_loss  # this chunk's logits go before the next chunk's are made
        piece_loss = piece_loss.detach()
        loss_sum = piece_loss if loss_sum is None else loss_sum + piece_loss
        correct = hit.sum() if correct is None else correct + hit.sum()
    return loss_sum / divisor, correct, count, grad_z


class _ChunkedProjectionLoss(torch.autograd.Function):
    """The chunked norm + unembedding + CE of one head inside a larger graph (the naive loss):
    forward computes the loss and its gradients chunk by chunk (`chunked_cross_entropy`);
    backward hands them out scaled by grad_output. Exact for the mean CE, which is the sum of
    the chunks' token losses over one count."""

    @staticmethod
    def forward(ctx, heads: MultiTokenHeads, i, z, labels, names, *shared):
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in zip(names, shared)}
            loss, correct, count, grad_z = chunked_cross_entropy(
                heads, i, z, labels, leaves, backward=True
            )
        grads = [leaves[n].grad for n in names]
        ctx.slots = [k for k, g in enumerate(grads) if g is not None]
        ctx.n_shared = len(shared)
        ctx.save_for_backward(grad_z, *[g for g in grads if g is not None])
        ctx.mark_non_differentiable(correct, count)
        return loss, correct, count

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grad_z, *grads = ctx.saved_tensors
        shared_grads = [None] * ctx.n_shared
        for slot, g in zip(ctx.slots, grads):
            shared_grads[slot] = g.mul_(grad_loss)  # in place, as in _SequentialHeadLoss
        return (None, None, grad_z.mul_(grad_loss), None, None, *shared_grads)
