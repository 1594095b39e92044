"""`DeepSpeedTrainEngine`: the TrainEngine of every distributed layout.

DeepSpeed owns the optimizer step: AdamW (torch's), the warmup + cosine schedule of the local
engine (a LambdaLR handed to DeepSpeed), gradient accumulation, clipping (global norm over the
model-parallel group through `mpu`), ZeRO stage 0-3 (stage <= 1 with a pipeline) and bf16 on GPU.
Each micro-batch gets one forward and ONE backward call: the sequential head loss is a single
autograd Function (docs/distributed.md), which is what lets it survive ZeRO 2 and 3.

The model is built once per rank from the single-process initialisation (same seed, same
weights for every layout), then cut into this rank's tensor-parallel / head-parallel / pipeline
part, so every layout starts from exactly the weights `LocalEngine` would start from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..model import LocalLayers, MTPModel, parameter_table, split_window
from ..model.init import initial_parameters
from ..training.engine import (
    HeadTotals,
    StepMetrics,
    apply_recompute,
    lr_lambda,
    param_dtype,
    param_groups,
    uses_bf16,
)
from ..training.freeze import add_anchor, apply_freeze, zero_link
from . import checkpointing
from .head_parallel import HeadParallel, gather_head_metrics, mark_head_params
from .pipeline import build_pipeline
from .sequence_parallel import SequenceShards, reduce_sequence_parallel_grads
from .tensor_parallel import MegatronLayers, load_initial_params
from .topology import MegatronMPU, Topology, check_layout


def deepspeed_config(cfg: RunConfig, topo: Topology, bf16: bool) -> dict:
    """The DeepSpeed config, derived from TrainConfig and ParallelConfig only."""
    t, stage = cfg.train, cfg.parallel.zero_stage
    zero: dict = {"stage": stage}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * topo.data,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                # torch's AdamW: no op build needed, same update as LocalEngine on CPU and GPU.
                "torch_adam": True,
            },
        },
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # With tensor parallelism DeepSpeed's pipeline sends 1/tp of each activation and
        # all-gathers it over the tensor group on arrival: right when the activation is the
        # same on every tensor rank, wrong under sequence parallelism (each holds its own slice
        # of the sequence, already 1/tp of the data), so those activations go whole.
        "pipeline": {
            "pipe_partitioned": not cfg.parallel.sequence_parallel,
            "grad_partitioned": not cfg.parallel.sequence_parallel,
        },
    }


def build_model(
    cfg: RunConfig,
    topo: Topology,
    rank: int,
    initial: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> MTPModel:
    """This rank's part of the model, initialised from the single-process weights: `initial`
    (canonical name, full tensor), e.g. a checkpoint's (`--init-from`), or the random init.
    Its parameters carry their canonical names (mtp_dist/model/params.py)."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()  # also the head-parallel group
    dtype = param_dtype(cfg.train.precision)
    sequence_parallel = cfg.parallel.sequence_parallel
    table = parameter_table(cfg.model)
    layers = None
    if topo.tensor > 1:
        layers = MegatronLayers(cfg.model.init_std, dtype, sequence_parallel)
    head_parallel = topo.head > 1
    # The chained family's modules read the residual stream on this rank's positions and
    # gather only before the projection (model/chain.py).
    shards = SequenceShards(tp_group) if sequence_parallel else None
    model = MTPModel(
        cfg.model,
        layers,
        head_layers=LocalLayers(cfg.model.init_std) if head_parallel else None,
        head_ids=topo.head_ids(rank, cfg.model.n_future) if head_parallel else None,
        head_reduction=HeadParallel(tp_group) if head_parallel else None,
        sequence_gather=shards.gather if shards else None,
        sequence_positions=shards.positions if shards else None,
    )
    if head_parallel:
        mark_head_params(model, table)
    model = model.to(dtype)
    if initial is None:
        initial = initial_parameters(cfg.model, cfg.train.seed)  # one layer at a time
    load_initial_params(model, initial, table, topo.coord(rank).model, topo.tensor)
    # Frozen before anything keeps a list of parameters: the gradient hooks below, the pipeline
    # module and DeepSpeed's optimizer, ZeRO partitions and gradient buffers see only the rest.
    apply_freeze(model, cfg.model, cfg.train.freeze)
    if sequence_parallel:
        reduce_sequence_parallel_grads(model, tp_group)
    return model


def _anchor_loss(model: MTPModel) -> None:
    """A rank whose part of the model trains nothing (`train.freeze`): placeholder parameters
    (`add_anchor`) linked into the loss by a forward hook on the model, so DeepSpeed has
    parameters to optimize and a loss to backpropagate. (Not under ZeRO-3, which config
    validation refuses for such a rank: ZeRO-3 wants every rank to fetch the same modules in
    the same order, and this rank's backward enters none.)"""
    anchors = add_anchor(model)

    def link(module, args, out):
        return out._replace(loss=zero_link(out.loss, *anchors))

    model.register_forward_hook(link)


class DeepSpeedTrainEngine:
    """TrainEngine over DeepSpeed for the layout `topo` (groups already built)."""

    def __init__(
        self, cfg: RunConfig, topo: Topology, rank: int, device: torch.device, initial=None
    ) -> None:
        import deepspeed
        from megatron.core import parallel_state

        check_layout(cfg, topo)
        self.cfg, self.topo, self.rank, self.device = cfg, topo, rank, device
        self.seq_len = cfg.data.seq_len
        self.head_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pipe_group = parallel_state.get_pipeline_model_parallel_group()
        self.bf16 = uses_bf16(cfg.train.precision, device)
        model = build_model(cfg, topo, rank, initial)
        # Before the pipeline is cut and DeepSpeed wraps the model: the hooks go on this
        # rank's own trunk layers, whichever stage or engine runs them.
        self.recomputed = apply_recompute(model, cfg.train.recompute)
        # Parameters by identity -> canonical name: the pipeline module re-nests the same
        # parameter objects under its own names, so names are taken before it exists.
        self._names = {param: name for name, param in model.named_parameters()}
        self.loss_fn = None
        if topo.pipeline > 1:
            shards = topo.tensor if cfg.parallel.sequence_parallel else 1
            net, self.loss_fn = build_pipeline(
                model, topo.deepspeed_topology(), cfg.train.seed, sequence_shards=shards
            )
            mpu = None  # DeepSpeed takes the pipeline grid (same layout, checked in tests)
        else:
            net, mpu = model, MegatronMPU()
            if cfg.model.tie_embeddings and cfg.parallel.zero_stage == 3:
                # The heads project by the embedding's matrix: ZeRO-3 must gather it around
                # the heads' forward too, not only the embedding's (size 0 there otherwise).
                deepspeed.zero.register_external_parameter(model.heads, model.embed.weight)
            if not any(p.requires_grad for p in model.parameters()):
                _anchor_loss(model)  # a head-parallel rank of frozen heads only
        self.engine, _, _, _ = deepspeed.initialize(
            model=net,
            model_parameters=param_groups(net, cfg.train.weight_decay),
            config=deepspeed_config(cfg, topo, self.bf16),
            mpu=mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
            dist_init_required=False,
        )
        self.model = self.engine.module
        self._stage0_norm: float | None = None

    # -- names -----------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under their canonical names (whatever module holds them);
        not a frozen rank's placeholder (`add_anchor`), which is no part of the model."""
        return [(self._names[p], p) for p in self.engine.module.parameters() if p in self._names]

    @staticmethod
    def is_sharded(param: torch.nn.Parameter) -> bool:
        """Is this parameter a tensor-parallel slice of a larger full parameter? (Megatron's
        tensor-parallel layers mark theirs with `partition_dim`.)"""
        return hasattr(param, "partition_dim")

    # -- steps -----------------------------------------------------------------------------
    def _split(self, window: torch.Tensor):
        return split_window(window.to(self.device), self.seq_len)

    def _all_finite(self, loss: torch.Tensor | None) -> bool:
        """Every rank's loss finite? (one MIN all-reduce; pipeline ranks without a loss vote 1)"""
        ok = torch.tensor([1.0 if loss is None or torch.isfinite(loss).all() else 0.0])
        ok = ok.to(self.device)  # NCCL reduces device tensors only
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() == 1.0)

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepMetrics:
        if len(micro_batches) != self.cfg.train.grad_accum_steps:
            raise ValueError(
                f"{len(micro_batches)} micro-batches, DeepSpeed expects "
                f"train.grad_accum_steps={self.cfg.train.grad_accum_steps}"
            )
        self.engine.train()
        lr = self.engine.get_lr()[0]
        tokens = sum(w.shape[0] * self.seq_len for w in micro_batches)
        if self.topo.pipeline > 1:
            return self._pipeline_step(micro_batches, tokens, lr)
        outputs = []
        for k, window in enumerate(micro_batches):
            inputs, labels = self._split(window)
            out = self.engine(inputs, labels)
            outputs.append(out)
            # Checked on all ranks BEFORE backward: a skipped step must not reach ZeRO's
            # gradient buffers, which DeepSpeed gives no way to clear mid-accumulation.
            if not self._all_finite(out.loss):
                if k > 0:
                    raise FloatingPointError(
                        f"non-finite loss in micro-batch {k} after {k} accumulated backward "
                        "passes: DeepSpeed cannot drop accumulated ZeRO gradients"
                    )
                return self._skipped(outputs, tokens, "non-finite loss")
            self.engine.backward(out.loss)
            if k == len(micro_batches) - 1:
                self._stage0_norm = self._unclipped_norm()
            self.engine.step()
        return self._metrics(outputs, tokens, lr)

    def _unclipped_norm(self) -> float | None:
        """Without ZeRO DeepSpeed clips but does not keep the norm: compute it (model-parallel
        aware, same counting rule as its clipping) for the metrics. ZeRO stages report theirs."""
        if self.cfg.parallel.zero_stage > 0 or self.bf16:
            return None
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        return float(clip_grad_norm_(params, max_norm=float("inf"), mpu=self.engine.mpu))

    def _pipeline_step(self, micro_batches, tokens: int, lr: float) -> StepMetrics:
        batches = [self._split(w) for w in micro_batches]
        self.loss_fn.outputs = []
        self.engine.train_batch(iter(batches))
        # A pipeline runs forward and backward in one schedule, so the finiteness check can only
        # follow it; a non-finite loss makes DeepSpeed's own step non-finite, and we report it.
        metrics = self._metrics(self.loss_fn.outputs, tokens, lr)
        if not math.isfinite(metrics.loss):
            metrics.skipped, metrics.extra = True, {"why": "non-finite loss (pipeline)"}
        return metrics

    def _skipped(self, outputs, tokens: int, why: str) -> StepMetrics:
        metrics = self._metrics(outputs, tokens, 0.0, reduce_dp=False)
        metrics.skipped, metrics.extra = True, {"why": why}
        return metrics

    def _metrics(self, outputs, tokens: int, lr: float, reduce_dp: bool = True) -> StepMetrics:
        """Per-head metrics over micro-batches, all heads (head parallel), all data-parallel
        ranks (mean), and every pipeline stage (broadcast from the last)."""
        totals = None
        if outputs:
            totals = HeadTotals.of(outputs)
            if self.topo.head > 1:
                ids = tuple(range(self.cfg.model.n_future))
                totals = HeadTotals(ids, *gather_head_metrics(totals, self.head_group))
        if self.topo.pipeline > 1:
            box = [totals]
            last = dist.get_process_group_ranks(self.pipe_group)[-1]
            dist.broadcast_object_list(box, src=last, group=self.pipe_group)
            totals = box[0]
        if reduce_dp and self.topo.data > 1:
            parts = (totals.head_losses, totals.head_correct, totals.head_counts)
            stats = torch.cat([x.to(self.device, torch.float64) for x in parts])
            dist.all_reduce(stats, group=self.dp_group)
            losses, correct, counts = stats.cpu().chunk(3)
            totals = HeadTotals(
                totals.head_ids, losses / self.topo.data, correct, counts, totals.head_weights
            )
        metrics = totals.metrics(tokens)
        norm = self.engine.get_global_grad_norm() if lr else None
        norm = self._stage0_norm if norm is None and lr else norm
        metrics.grad_norm = float(norm) if norm is not None else float("nan")
        metrics.lr = lr
        return metrics

    @torch.no_grad()
    def eval_step(self, batch: torch.Tensor) -> StepMetrics:
        self.engine.eval()
        inputs, labels = self._split(batch)
        tokens = inputs.numel()
        if self.topo.pipeline > 1:
            self.loss_fn.outputs = []
            self.engine.eval_batch(iter([(inputs, labels)]), num_micro_batches=1)
            return self._metrics(self.loss_fn.outputs, tokens, 0.0)
        return self._metrics([self.engine(inputs, labels)], tokens, 0.0)

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        checkpointing.save(self, Path(directory))

    def load(self, directory: Path) -> None:
        checkpointing.load(self, Path(directory))
