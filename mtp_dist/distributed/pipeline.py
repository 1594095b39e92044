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
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import LossOutput, MTPModel


class EmbedStage(nn.Module):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T, d)


class _Rotary(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, *self.tables(x.shape[1]))


class HeadStage(_Rotary):
    """Holds MultiTokenHeads on the last stage; its forward passes h on to the loss function."""

    def __init__(self, model: MTPModel, sequence_shards: int) -> None:
        super().__init__(model, sequence_shards)
        self.heads = model.heads

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class HeadLoss:
    """The PipelineModule's loss_fn: the heads' loss on h; keeps each micro-batch's LossOutput
    (per-head metrics) for the engine to collect."""

    def __init__(self, stage: HeadStage) -> None:
        self.stage = stage
        self.outputs: list[LossOutput] = []

    def __call__(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.stage.heads(h, labels, *self.stage.tables(h.shape[1]))
        self.outputs.append(out)
        return out.loss


def pipeline_layers(model: MTPModel, sequence_shards: int = 1) -> tuple[list[nn.Module], HeadLoss]:
    stages: list[nn.Module] = [EmbedStage(model.embed)]
    stages += [TrunkStage(block, model, sequence_shards) for block in model.trunk]
    head = HeadStage(model, sequence_shards)
    return stages + [head], HeadLoss(head)


def build_pipeline(model: MTPModel, topology, seed: int, sequence_shards: int = 1):
    """(PipelineModule over `topology` (DeepSpeed ProcessTopology), its HeadLoss)."""
    from deepspeed.pipe import PipelineModule

    layers, loss = pipeline_layers(model, sequence_shards)
    module = PipelineModule(
        layers=layers,
        loss_fn=loss,
        topology=topology,
        partition_method="uniform",  # by layer count: embedding, blocks, heads
        base_seed=seed,
        activation_checkpoint_interval=0,
    )
    return module, loss
