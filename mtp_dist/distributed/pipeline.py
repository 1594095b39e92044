"""Pipeline parallelism: the MTP model as a DeepSpeed PipelineModule (1F1B schedule).

    layer 0          EmbedStage    input ids (B, T) -> x (B, T, d)        first stage
    layers 1..L      TrunkStage    x -> block(x)                          split by count
    layer L+1        HeadStage     h -> h; the loss_fn runs the heads     last stage

Megatron-core's own pipeline schedules allocate on CUDA in 0.16.1 (`torch.zeros(...,
device="cuda")` in forward_backward_pipelining_without_interleaving), so the schedule
comes from DeepSpeed's PipelineEngine (the Megatron-DeepSpeed combination: Megatron tensor
parallelism inside each stage, DeepSpeed pipeline, ZeRO-1), which runs on CPU/gloo and GPU/NCCL.
The heads, final norm and shared unembedding live on the last stage; the loss function is the
model's own sequential head loss, so the last stage backpropagates its heads one at a time and
sends one trunk-output gradient upstream.

The chained family (`model.mtp_arch=chained`): the whole chain (depth 0 and the modules) is on
the last stage, and its modules read the input embedding of the tokens ahead, which the loss
function embeds from the labels. The last stage therefore holds the embedding too, tied to the
first stage's (Megatron's embedding group): the embedding layer and the chain's stage are
DeepSpeed TiedLayerSpecs of one key, so DeepSpeed sums `embed.weight`'s gradient over the two
stages before the optimizer step (ReduceTiedGrads), the same sum on both, and counts it once
in the gradient norm (`ds_pipe_replicated` on the last stage's copy). The parallel family's
layers are unchanged.

Frozen layers (`train.freeze`): DeepSpeed's schedule runs a backward on every stage and sends a
gradient for every activation it received (it marks each one requires_grad and asserts that
its .grad exists). When nothing before a stage trains, that gradient is never used, so the
stage cuts its input (`StageLink`): its layers run on a detached copy (a frozen trunk layer
then builds no graph and keeps no activations, as in MTPModel.forward), and a zero gradient is
linked back to the received tensor through the loss (last stage) or the stage's output
(earlier stages): that is what DeepSpeed sends. A stage that trains nothing (under either
mode, every stage before the last) holds placeholder parameters linked the same way
(`add_anchor`): DeepSpeed's optimizer and backward call need some.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import LossOutput, MTPModel
from ..training.freeze import add_anchor, zero_link


class StageLink:
    """This rank's stage, when something is frozen (`mark_frozen`); shared by its first layer,
    its last layer and the loss. `cut`: the first layer, when nothing before the stage trains,
    detaches the received activation and keeps it. `link`: the last layer's output (or the
    loss, on the last stage) gets zero gradients for the received activation and for the
    stage's placeholder parameters, if it has them."""

    def __init__(self, cuts: bool, anchors: tuple[torch.nn.Parameter, ...]) -> None:
        self.cuts, self.anchors = cuts, anchors
        self.received: torch.Tensor | None = None

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuts and torch.is_grad_enabled() and x.requires_grad:  # a received activation
            self.received, x = x, x.detach()
        return x

    def link(self, y: torch.Tensor) -> torch.Tensor:
        received, self.received = self.received, None
        return zero_link(y, *([] if received is None else [received]), *self.anchors)


class _Layer(nn.Module):
    """A pipeline layer; `first` / `last` are set on this rank's first and last layer when
    something is frozen (`mark_frozen`)."""

    first: StageLink | None = None
    last: StageLink | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is not None:
            x = self.first.cut(x)
        y = self.run(x)
        return y if self.last is None else self.last.link(y)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EmbedStage(_Layer):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T, d)


class _Rotary(_Layer):
    """Rotary tables for the full sequence. `sequence_shards` > 1 under sequence parallelism,
    where the activations between stages hold 1/sequence_shards of the sequence."""

    def __init__(self, model: MTPModel, sequence_shards: int) -> None:
        super().__init__()
        self.sequence_shards = sequence_shards
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def tables(self, local_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = local_length * self.sequence_shards
        return self.rope_cos[:length], self.rope_sin[:length]


class TrunkStage(_Rotary):
    def __init__(self, block: nn.Module, model: MTPModel, sequence_shards: int) -> None:
        super().__init__(model, sequence_shards)
        self.block = block

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, *self.tables(x.shape[1]))


class HeadStage(_Rotary):
    """Holds MultiTokenHeads on the last stage; its forward passes h on to the loss function."""

    def __init__(self, model: MTPModel, sequence_shards: int) -> None:
        super().__init__(model, sequence_shards)
        self.heads = model.heads

    def run(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        return self.heads(h, labels, *self.tables(h.shape[1]))


class ChainStage(HeadStage):
    """The chained family's last stage: the chain, and the tied copy of the input embedding
    that embeds its modules' tokens from the labels (MTPModel.embed_ahead)."""

    def __init__(self, model: MTPModel, sequence_shards: int) -> None:
        super().__init__(model, sequence_shards)
        self.embed = model.embed
        # embed_ahead reads model.embed (this stage's module) and the model's sequence split;
        # the model is not registered here (its other parameters belong to other stages).
        object.__setattr__(self, "_embed_ahead", model.embed_ahead)

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        cos, sin = self.tables(h.shape[1])
        positions = torch.arange(cos.shape[0], device=h.device)
        return self.heads(h, labels, cos, sin, self._embed_ahead(labels, positions))


class HeadLoss:
    """The PipelineModule's loss_fn: the heads' loss on h; keeps each micro-batch's LossOutput
    (per-head metrics) for the engine to collect."""

    def __init__(self, stage: HeadStage) -> None:
        self.stage = stage
        self.outputs: list[LossOutput] = []
        self.link: StageLink | None = None  # the last stage's, when something is frozen

    def __call__(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.stage.loss(h, labels)
        self.outputs.append(out)
        # Linked here, not to h: a frozen trunk output needs no gradient from the heads.
        return out.loss if self.link is None else self.link.link(out.loss)


def pipeline_layers(model: MTPModel, sequence_shards: int = 1) -> tuple[list[nn.Module], HeadLoss]:
    stages: list[nn.Module] = [EmbedStage(model.embed)]
    stages += [TrunkStage(block, model, sequence_shards) for block in model.trunk]
    head = (ChainStage if model.cfg.chained else HeadStage)(model, sequence_shards)
    return stages + [head], HeadLoss(head)


EMBED_KEY = "embed"  # the chained family's tie: the embedding layer and the chain's stage


def _tied_layer(layer: nn.Module, key: str, weight: str):
    """A TiedLayerSpec of an already built layer (build_model builds the whole model on each
    rank and the layers hold its modules): DeepSpeed keeps it on the stage that owns it and
    sums the gradient of `weight` (a dotted attribute path) over the stages tied by `key`."""
    from deepspeed.pipe import TiedLayerSpec

    class Built(TiedLayerSpec):
        def build(self, log: bool = False) -> nn.Module:
            return layer

    return Built(key, type(layer), tied_weight_attr=[weight])


def _module_specs(layers: list[nn.Module], chained: bool) -> list:
    """What the PipelineModule is given: the layers themselves, except that a chain's
    embedding layer and last stage are tied by the embedding (the module docstring)."""
    if not chained:
        return list(layers)
    first, last = layers[0], layers[-1]
    return [
        _tied_layer(first, EMBED_KEY, "embed.weight"),
        *layers[1:-1],
        _tied_layer(last, EMBED_KEY, "embed.weight"),
    ]


def _count_tied_embedding_once(module) -> None:
    """DeepSpeed marks every parameter of a tied layer on the later stages `ds_pipe_replicated`
    (left out of the gradient norm, counted on the first stage instead); of the chain's stage
    only the embedding is replicated: its other parameters (the chain's) count here."""
    comm = module.tied_comms.get(EMBED_KEY)
    if comm is None or module.global_rank == comm["ranks"][0]:
        return
    stage = comm["module"]
    for param in stage.parameters():
        if param is not stage.embed.weight:
            param.ds_pipe_replicated = False


def _trains(layers: list[_Layer]) -> bool:
    return any(p.requires_grad for layer in layers for p in layer.parameters())


def mark_frozen(layers: list[_Layer], loss: HeadLoss, start: int, stop: int) -> StageLink | None:
    """This rank's stage is layers [start, stop). If no layer before it trains, its first layer
    cuts the received activation; if none of its own trains, its last layer gets placeholder
    parameters; either is linked back by the last layer (the loss on the last stage). Every
    rank built every layer (the PipelineModule keeps its own), so all of them can be read.
    With nothing frozen nothing changes."""
    if all(p.requires_grad for layer in layers for p in layer.parameters()):
        return None
    cuts = not _trains(layers[:start])
    own = _trains(layers[start:stop])
    if own and not cuts:
        return None
    link = StageLink(cuts, () if own else add_anchor(layers[stop - 1]))
    layers[start].first = link
    if stop == len(layers):
        loss.link = link
    else:
        layers[stop - 1].last = link
    return link


def build_pipeline(model: MTPModel, topology, seed: int, sequence_shards: int = 1):
    """(PipelineModule over `topology` (DeepSpeed ProcessTopology), its HeadLoss)."""
    from deepspeed.pipe import PipelineModule

    layers, loss = pipeline_layers(model, sequence_shards)
    module = PipelineModule(
        layers=_module_specs(layers, model.cfg.chained),
        loss_fn=loss,
        topology=topology,
        partition_method="uniform",  # by layer count: embedding, blocks, heads
        base_seed=seed,
        activation_checkpoint_interval=0,
    )
    # This rank's layer range (DeepSpeed 0.19.8 keeps it in these attributes).
    mark_frozen(layers, loss, module._local_start, module._local_stop)
    _count_tied_embedding_once(module)  # after mark_frozen: placeholders count too
    return module, loss
