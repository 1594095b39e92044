"""The chained family of multi-token prediction (DeepSeek-V3, GLM-4.5, MiMo): `mtp_arch=chained`.

The main model is the whole next-token model: trunk, its last layer (here "depth 0", the layer
the parallel family calls head 1), the final norm and the unembedding U. Module k = 1..n-1
reads the previous depth's normed hidden state and the embedding E of token t+k:

    h^0 = final_norm(Block_0(trunk(x)))                         logits^0 = U h^0, predicts x_{t+1}
    h^k = norm_k(Block_k(W_k [enorm_k(E x_{t+k}) ; hnorm_k(h^{k-1})]))
                                                             logits^k = U h^k, predicts x_{t+k+1}

E and U are shared with the main model. These are GLM-4.5's conventions as the serving engines
read them (docs/interop.md): the hidden state fed to module 1 is taken AFTER the final norm,
the concatenation is [embedding ; hidden], module k > 1 reads module k-1's output after its own
norm (GLM's `shared_head.norm`), and the token embedding at sequence position 0 is zeroed.

Loss = CE_0 + lambda * mean_k CE_k (`model.mtp_loss_weight` = lambda).

The sequential memory trick carried to a chain (`_SequentialChainLoss`, docs/sequential_heads.md):
forward runs depth after depth; each depth's logits are made, its cross-entropy backpropagated
into that depth's output (a detached leaf) and the shared U at once, and the logits freed before
the next depth projects. The depths' block graphs stay (the modules' own activations); a reverse
sweep then backpropagates each depth's block once, last depth first, so the gradient a depth's
output receives from the depths after it has arrived before its own block is backpropagated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from .heads import TIED_WEIGHT as TIED
from .heads import LossOutput, MultiTokenHeads, chunked_cross_entropy
from .layers import IGNORE_INDEX, LayerFactory, rms_norm


class ChainModule(nn.Module):
    """Module k of the chain: enorm, hnorm, eh_proj (d x 2d), one transformer layer, norm.

    The three norms are applied as plain RMSNorms on this rank's positions (never the gathering
    norm of sequence parallelism): the module's inputs and output stay in the layout of the
    residual stream, and the projection gathers where it needs the whole sequence."""

    def __init__(self, d_model: int, eps: float, layers: LayerFactory, block) -> None:
        """`block`: a callable making the module's transformer layer from `layers`."""
        super().__init__()
        self.eps = eps
        self.enorm = layers.norm(d_model, eps)
        self.hnorm = layers.norm(d_model, eps)
        self.eh_proj = layers.replicated(2 * d_model, d_model)
        self.block = block(layers)
        self.norm = layers.norm(d_model, eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        embedded: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
    ) -> torch.Tensor:
        """h^{k-1} (B, T, d) and E x_{t+k} (B, T, d) -> h^k (B, T, d), normed."""
        x = torch.cat(
            (
                rms_norm(embedded, self.enorm.weight, self.eps),
                rms_norm(h_prev, self.hnorm.weight, self.eps),
            ),
            dim=-1,
        )
        z = self.block(self.eh_proj(x), cos, sin, kv_cache)
        return rms_norm(z, self.norm.weight, self.eps)


def zero_first_position(embedded: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The engines' convention: a module's token embedding at sequence position 0 is zero.
    `positions` (T,) or (B, T) are the absolute positions of `embedded`'s (B, T) rows."""
    keep = (positions != 0).to(embedded.dtype)
    return embedded * (keep[..., None] if keep.dim() == 2 else keep[None, :, None])


class ChainedHeads(MultiTokenHeads):
    """Depth 0 (the main model's last layer + final norm) and the n-1 chained modules, with the
    shared unembedding, as one module owning their parameters under the flat names of
    params.py (heads.head{k}__..., heads.unembed__...), as MultiTokenHeads does and for the same
    reason (ZeRO-3 gathers them around the loss).

    `depth` k = 0..n-1 is what the parallel family calls head k + 1: it predicts t + k + 1."""

    def __init__(
        self,
        blocks: dict[int, nn.Module],
        unembed: nn.Module,
        *,
        loss_weight: float,
        sequence_gather=None,
        **kwargs,
    ) -> None:
        """`blocks[0]` is a Block, `blocks[k]` (k >= 1) a ChainModule; all n must be held (a
        chain cannot be split over head-parallel ranks). `loss_weight`: lambda.
        `sequence_gather`: x (B, t, d) -> the whole sequence (sequence parallelism; default
        identity) before the projection."""
        super().__init__(blocks, unembed, **kwargs)
        if self.head_ids != tuple(range(self.n_future)):
            raise ValueError("a chained model holds all of its depths in one place")
        self.loss_weight = loss_weight
        self.eps = unembed.norm.eps
        object.__setattr__(self, "_sequence_gather", sequence_gather or (lambda x: x))
        if self.n_future > 1:
            object.__setattr__(self, "_module_template", copy.deepcopy(blocks[1]).to("meta"))
        names = dict(self.shared_param_names)
        self.final_norm_name = names["norm.weight"]
        # What the projection U uses: the unembedding matrix (or, tied, the embedding's).
        self.proj_param_names = [(p, f) for p, f in self.shared_param_names if p != "norm.weight"]

    @property
    def head_weights(self) -> tuple[float, ...]:
        """Each depth's weight in the loss: 1 for the main model, lambda / (n-1) per module."""
        n = self.n_future
        # n = 1: the main model alone (no module, no lambda term).
        return (1.0,) + ((self.loss_weight / (n - 1),) * (n - 1) if n > 1 else ())

    def shared_flat_names(self) -> list[str]:
        """The tensors every depth's projection uses (U only: each depth norms its own)."""
        names = [flat for _, flat in self.proj_param_names]
        return names + ([TIED] if self.tied_weight is not None else [])

    def depth_param_names(self, k: int) -> list[str]:
        """Flat names of depth k's own parameters (depth 0 includes the final norm)."""
        own = [flat for _, flat in self.head_param_names[k]]
        return own + ([self.final_norm_name] if k == 0 else [])

    # -- running one depth ------------------------------------------------------------------
    def depth_hidden(
        self,
        k: int,
        h_prev: torch.Tensor,
        embedded: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """h^k from h^{k-1} (depth 0: from the trunk output) and, k >= 1, E x_{t+k}."""
        source = params if params is not None else self.weights()
        weights = self._params(self.head_param_names[k], source)
        if k == 0:
            z = functional_call(self._block_template, weights, (h_prev, cos, sin, kv_cache))
            return rms_norm(z, source[self.final_norm_name], self.eps)
        args = (h_prev, embedded, cos, sin, kv_cache)
        return functional_call(self._module_template, weights, args)

    def project(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        """U: normed hidden (B, t, d) -> logits (B, t or the gathered T, V[shard])."""
        source = params if params is not None else self.weights()
        x = self._sequence_gather(x)
        if self.tied_weight is not None:
            return functional_call(self._unembed_template.proj, {}, (x, source[TIED]))
        weights = {p.removeprefix("proj."): source[f] for p, f in self.proj_param_names}
        return functional_call(self._unembed_template.proj, weights, (x,))

    def logits(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, i: int = 0):
        if i != 0:
            raise ValueError("a chained module's logits need its input tokens: use depth_hidden")
        return self.project(self.depth_hidden(0, h, None, cos, sin))

    def _depth_loss(self, k, hk, labels, params=None):
        """(mean CE, #correct, #valid) of depth k from its normed output, in the caller's graph."""
        if self.loss_chunk > 0:
            return self._chunked_loss(k, hk, labels, params)
        return self._whole_loss(k, hk, labels, params)

    # -- the loss ---------------------------------------------------------------------------
    def forward(self, h, labels, cos, sin, embedded=()) -> LossOutput:
        """Loss of every depth for trunk output h (B, T, d), next-token labels (B, >= T + n - 1)
        and `embedded`: E x_{t+k} for k = 1..n-1, each (B, T, d), position 0 zeroed."""
        if len(embedded) != self.n_future - 1:
            raise ValueError(f"a chain of {self.n_future} depths needs {self.n_future - 1} inputs")
        if self.pad_id >= 0:
            labels = labels.masked_fill(labels == self.pad_id, IGNORE_INDEX)
        source = self.weights()
        inputs = (h, *embedded)
        trains = any(t.requires_grad for t in inputs) or any(
            p.requires_grad for p in source.values()
        )
        weights = self.head_weights
        if self.loss_impl == "sequential" and torch.is_grad_enabled() and trains:
            names, params = list(source), list(source.values())
            total, losses, correct, counts = _SequentialChainLoss.apply(
                self, names, len(inputs), labels, cos, sin, *inputs, *params
            )
        else:
            per_depth, hk = [], h
            for k in range(self.n_future):
                e = embedded[k - 1] if k else None
                hk = self.depth_hidden(k, hk, e, cos, sin)
                per_depth.append(self._depth_loss(k, hk, labels))
            losses = torch.stack([loss for loss, _, _ in per_depth])
            total = sum(w * loss for w, (loss, _, _) in zip(weights, per_depth))
            correct = torch.stack([c for _, c, _ in per_depth])
            counts = torch.stack([n for _, _, n in per_depth])
            losses = losses.detach()
        return LossOutput(total, losses, correct, counts, self.head_ids, weights)


class _SequentialChainLoss(torch.autograd.Function):
    """forward: every depth's forward with its cross-entropy backpropagated at once into the
    depth's output (a leaf) and U, then one reverse sweep through the depths' blocks; backward:
    hand the gradients out, each parameter's exactly once (as _SequentialHeadLoss, whose
    docstring says why ZeRO needs that)."""

    @staticmethod
    def forward(ctx, chain: ChainedHeads, names, n_inputs, labels, cos, sin, *tensors):
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        weights = chain.head_weights
        with torch.enable_grad():
            leaves_in = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in zip(names, params)}
            outputs, prev, stats = [], leaves_in[0], []
            for k in range(chain.n_future):
                e = leaves_in[k] if k else None
                hk = chain.depth_hidden(k, prev, e, cos, sin, params=leaves)
                # The next depth reads this leaf, so its gradient from later depths and from
                # this depth's own cross-entropy add up in one .grad.
                hk_leaf = hk.detach().requires_grad_(hk.requires_grad)
                stats.append(_project_and_backward(chain, k, hk_leaf, labels, leaves, weights[k]))
                outputs.append((hk, hk_leaf))
                prev = hk_leaf
            for k in reversed(range(chain.n_future)):
                hk, hk_leaf = outputs[k]
                if hk_leaf.grad is None or not hk.requires_grad:
                    continue
                below = leaves_in[0] if k == 0 else outputs[k - 1][1]
                wanted = [below] + ([leaves_in[k]] if k else [])
                wanted += [leaves[f] for f in chain.depth_param_names(k)]
                wanted = [t for t in wanted if t.requires_grad]
                if wanted:
                    torch.autograd.backward(hk, hk_leaf.grad, inputs=wanted)
                outputs[k] = None  # depth k's block graph goes here
        ctx.n_inputs = n_inputs
        ctx.input_grads = [
            leaf.grad if t.requires_grad else None for leaf, t in zip(leaves_in, inputs)
        ]
        ctx.grad_slots = [j for j, n in enumerate(names) if leaves[n].grad is not None]
        ctx.n_params = len(names)
        grads = [leaves[names[j]].grad for j in ctx.grad_slots]
        ctx.save_for_backward(*grads)
        losses, corrects, counts = (torch.stack(x) for x in zip(*stats))
        ctx.mark_non_differentiable(losses, corrects, counts)
        total = sum(w * loss for w, loss in zip(weights, losses))
        return total, losses, corrects, counts

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        input_grads = [None if g is None else g.mul_(grad_total) for g in ctx.input_grads]
        param_grads = [None] * ctx.n_params
        for slot, g in zip(ctx.grad_slots, ctx.saved_tensors):
            param_grads[slot] = g.mul_(grad_total)
        return (None, None, None, None, None, None, *input_grads, *param_grads)


def _project_and_backward(chain, k, hk_leaf, labels, leaves, weight):
    """Depth k's (mean CE, #correct, #valid) from its normed output; weight * CE backpropagated
    into hk_leaf.grad and the shared projection's .grad, the logits freed on return."""
    shared = [leaves[f] for f in chain.shared_flat_names()]
    wanted = [t for t in [hk_leaf, *shared] if t.requires_grad]
    if not wanted:
        with torch.no_grad():
            return chain._depth_loss(k, hk_leaf, labels, leaves)
    if chain.loss_chunk > 0:
        loss, correct, count, grad = chunked_cross_entropy(
            chain, k, hk_leaf, labels, leaves, backward=True, scale=weight
        )
        if hk_leaf.requires_grad:
            hk_leaf.grad = grad if hk_leaf.grad is None else hk_leaf.grad + grad
        return loss, correct, count
    loss, correct, count = chain._whole_loss(k, hk_leaf, labels, leaves)
    torch.autograd.backward(loss * weight, inputs=wanted)
    return loss.detach(), correct, count
