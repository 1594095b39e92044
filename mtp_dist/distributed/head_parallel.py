"""Head-parallel output layers: the n heads spread over the ranks of a head-parallel group.

Every rank of the group holds the same (replicated) trunk output h. Rank k runs its own whole
heads one after another through the sequential loss: the model is built holding only those heads
(`MTPModel(..., head_ids=...)`), and `HeadParallel`, the model's `HeadReduction` seam, sums over
the group what the heads share:

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

from ..model import MTPModel, ParamTable


class HeadParallel:
    """The HeadReduction of a head-parallel group: sums over the ranks holding the other heads."""

    def __init__(self, group) -> None:
        self.group = group

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


def mark_head_params(model: MTPModel, table: ParamTable) -> int:
    """Mark the held heads' parameters `tensor_model_parallel`, so that gradient clipping counts
    each of them once over the group (every rank holds different heads). Returns how many."""
    heads = {spec.name for spec in table.owned_by("head")}
    marked = 0
    for name, param in model.named_parameters():
        if name in heads:
            param.tensor_model_parallel = True
            marked += 1
    return marked


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
