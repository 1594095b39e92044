"""Head-parallel output layers: the n heads spread over the ranks of a head-parallel group.

Every rank of the group holds the same (replicated) trunk output h. Rank k runs its own whole
heads one after another through the sequential loss (MultiTokenHeads.head_ids), keeps only those
heads' parameters, and the two hooks of MultiTokenHeads sum over the group what the heads share:

    grad_h   = sum_k  dL_k/dh                 (reduce_hidden_grad: the trunk sees all n heads)
    grad_U   = sum_k  dL_k/dU                 (reduce_shared_grads: shared norm + unembedding)

The shared unembedding is replicated (not vocab-parallel): a vocab-parallel unembedding would
need every rank to run the unembedding for every head's hidden state (an all-gather of n hidden
states and n vocab-shard logit passes per rank), i.e. the tensor-parallel-heads cost we are
trying to beat; docs/head_parallel.md has the measurement. Head-owned parameters are marked
`tensor_model_parallel` so that gradient clipping counts them on every rank of the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import MTPModel


class HeadParallel:
    """Binds a model's heads to a head-parallel group (the hooks MultiTokenHeads exposes)."""

    def __init__(self, group, head_ids: tuple[int, ...]) -> None:
        self.group = group
        self.head_ids = head_ids

    def reduce_hidden_grad(self, grad_h: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(grad_h, group=self.group)
        return grad_h

    def reduce_shared_grads(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def apply_head_parallel(model: MTPModel, group, head_ids: tuple[int, ...]) -> HeadParallel:
    """Narrow `model.heads` to `head_ids`, drop the other heads' parameters, wire the hooks."""
    heads = model.heads
    binding = HeadParallel(group, head_ids)
    heads.head_ids = head_ids
    for i, names in enumerate(heads.head_param_names):
        for _, flat in names:
            if i in head_ids:
                heads._parameters[flat].tensor_model_parallel = True
            else:
                del heads._parameters[flat]  # memory: a rank keeps only its own heads
    heads.reduce_hidden_grad = binding.reduce_hidden_grad
    heads.reduce_shared_grads = binding.reduce_shared_grads
    return binding


def gather_head_metrics(out, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, correct, counts), each of shape (n,), in head order, from every rank's heads."""
    mine = (out.head_ids, out.head_losses.tolist(), out.head_correct.tolist(),
            out.head_counts.tolist())  # fmt: skip
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    rows: dict[int, tuple[float, float, float]] = {}
    for ids, losses, correct, counts in everyone:
        for i, loss, c, n in zip(ids, losses, correct, counts):
            rows[i] = (loss, c, n)
    ordered = [rows[i] for i in sorted(rows)]
    return tuple(torch.tensor([r[j] for r in ordered], dtype=torch.float64) for j in range(3))
