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
        pad_id: int = -1,
        reduction: HeadReduction | None = None,
    ) -> None:
        """`blocks`: head index -> that head's layer, for the heads this module holds (all n,
        except under head parallelism); `unembed`: the shared final norm + unembedding. Their
        parameters are adopted under flat names; the modules become parameter-free templates."""
        super().__init__()
        if not blocks:
            raise ValueError("MultiTokenHeads needs at least one head")
        self.n_future = n_future
        self.pad_id = pad_id
        self.loss_impl = loss_impl
        self._token_loss = token_loss
        self.reduction: HeadReduction = reduction or LocalHeads()
        # Which heads this module runs (all n in one process, a subset per head-parallel rank).
        self.head_ids: tuple[int, ...] = tuple(sorted(blocks))
        # (template path, flat parameter name) per held head, and for the shared unembedding.
        self.head_param_names: dict[int, list[tuple[str, str]]] = {
            i: self._adopt(Owner("head", i), block) for i, block in sorted(blocks.items())
        }
        self.shared_param_names: list[tuple[str, str]] = self._adopt(Owner("unembed"), unembed)
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
        source = params if params is not None else dict(self.named_parameters())
        weights = self._params(self.head_param_names[i], source)
        return functional_call(self._block_template, weights, (h, cos, sin, kv_cache))

    def project(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Shared final norm + unembedding: (B, T, d) -> (B, T, V[shard])."""
        source = params if params is not None else dict(self.named_parameters())
        weights = self._params(self.shared_param_names, source)
        return functional_call(self._unembed_template, weights, (x,))

    def logits(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, i: int = 0):
        return self.project(self.head_hidden(i, h, cos, sin))

    def head_loss(self, i, h, labels, cos, sin, params=None):
        """(mean CE, #correct, #valid) of head i (0-based; predicts t + i + 1)."""
        logits = self.project(self.head_hidden(i, h, cos, sin, params=params), params)
        # (B, T) from the logits: under sequence parallelism h holds a slice of the sequence.
        B, T = logits.shape[:2]
        target = shift_labels(labels, i, T).reshape(-1)
        token_loss, correct = self._token_loss(logits.reshape(B * T, -1), target)
        count = (target != IGNORE_INDEX).sum()
        loss = token_loss.sum() / count.clamp(min=1)
        return loss, correct.sum(), count

    # -- the loss ---------------------------------------------------------------------------
    def forward(
        self, h: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> LossOutput:
        """Loss over heads for trunk output h (B, T, d) and next-token labels (B, >= T)."""
        if self.pad_id >= 0:  # packed shards pad the last window of a split
            labels = labels.masked_fill(labels == self.pad_id, IGNORE_INDEX)
        if self.loss_impl == "sequential" and torch.is_grad_enabled() and h.requires_grad:
            names = [flat for flat, _ in self.named_parameters()]
            params = [p for _, p in self.named_parameters()]
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
    """forward: per-head forward + autograd.grad, accumulating gradients; backward: hand them out.

    Each parameter receives its gradient exactly once per backward: ZeRO-2 refuses a gradient
    reduced twice for one partition, and ZeRO-3 holds the full weights only during this module's
    forward and backward (docs/sequential_heads.md).
    The gradients are exact for a backward of the returned total with any scalar grad_output.
    """

    @staticmethod
    def forward(ctx, heads: MultiTokenHeads, names, h, labels, cos, sin, *params):
        with torch.enable_grad():
            h_leaf = h.detach().requires_grad_(True)
            leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in zip(names, params)}
            grad_h = torch.zeros_like(h)
            grads: dict[str, torch.Tensor] = {}
            losses, corrects, counts = [], [], []
            shared = [flat for _, flat in heads.shared_param_names]
            for i in heads.head_ids:
                wanted = [flat for _, flat in heads.head_param_names[i]] + shared
                wanted = [n for n in wanted if leaves[n].requires_grad]
                loss, correct, count = heads.head_loss(i, h_leaf, labels, cos, sin, leaves)
                # Frees head i's graph (its logits and their gradient) before head i+1 runs.
                got = torch.autograd.grad(loss, [h_leaf] + [leaves[n] for n in wanted])
                grad_h += got[0]
                for n, g in zip(wanted, got[1:]):
                    grads[n] = g if n not in grads else grads[n] + g
                losses.append(loss.detach())
                corrects.append(correct)
                counts.append(count)
        grad_h = heads.reduction.reduce_hidden_grad(grad_h)
        heads.reduction.reduce_shared_grads([grads[n] for n in shared if n in grads])
        ctx.grad_names = [n for n in names if n in grads]
        ctx.param_slots = [names.index(n) for n in ctx.grad_names]
        ctx.n_params = len(names)
        ctx.save_for_backward(grad_h, *[grads[n] for n in ctx.grad_names])
        losses, corrects, counts = torch.stack(losses), torch.stack(corrects), torch.stack(counts)
        ctx.mark_non_differentiable(losses, corrects, counts)
        return losses.sum(), losses, corrects, counts

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        grad_h, *saved = ctx.saved_tensors
        param_grads = [None] * ctx.n_params
        for slot, g in zip(ctx.param_slots, saved):
            param_grads[slot] = g * grad_total
        return (None, None, grad_h * grad_total, None, None, None, *param_grads)
