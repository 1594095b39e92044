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
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..model import LocalLayers, MTPModel, split_window
from ..model.init import initial_parameters
from ..training.engine import StepMetrics, lr_lambda, param_groups
from . import checkpointing
from .head_parallel import apply_head_parallel, gather_head_metrics
from .pipeline import build_pipeline, full_name
from .sequence_parallel import reduce_sequence_parallel_grads
from .tensor_parallel import MegatronLayers, load_initial_params, unwrap_name
from .topology import MegatronMPU, Topology, check_layout


def param_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.float64 if cfg.train.precision == "fp64" else torch.float32


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and device.type == "cuda")


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


def build_model(cfg: RunConfig, topo: Topology, rank: int) -> tuple[MTPModel, dict[str, str]]:
    """This rank's part of the model, initialised from the single-process weights.

    Returns (model, sharded): `sharded` maps local parameter names that are tensor-parallel
    shards to their full (MTPModel) names."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()  # also the head-parallel group
    dtype = param_dtype(cfg)
    sequence_parallel = cfg.parallel.sequence_parallel
    layers = None
    if topo.tensor > 1:
        layers = MegatronLayers(cfg.model.init_std, dtype, sequence_parallel)
    head_layers = LocalLayers(cfg.model.init_std) if topo.head > 1 else None
    model = MTPModel(cfg.model, layers, head_layers)
    sharded = {
        n: unwrap_name(n)
        for n, p in model.named_parameters()
        if hasattr(p, "partition_dim")  # set by Megatron's tensor-parallel layers
    }
    if topo.head > 1:
        apply_head_parallel(model, tp_group, topo.head_ids(rank, cfg.model.n_future))
    model = model.to(dtype)
    initial = initial_parameters(cfg.model, cfg.train.seed)  # one layer at a time
    load_initial_params(model, initial, topo.coord(rank).model, topo.tensor, set(sharded))
    if sequence_parallel:
        reduce_sequence_parallel_grads(model, tp_group)
    return model, sharded


class DeepSpeedTrainEngine:
    """TrainEngine over DeepSpeed for the layout `topo` (groups already built)."""

    def __init__(self, cfg: RunConfig, topo: Topology, rank: int, device: torch.device) -> None:
        import deepspeed
        from megatron.core import parallel_state

        check_layout(cfg, topo)
        self.cfg, self.topo, self.rank, self.device = cfg, topo, rank, device
        self.seq_len = cfg.data.seq_len
        self.head_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pipe_group = parallel_state.get_pipeline_model_parallel_group()
        self.bf16 = use_bf16(cfg, device)
        model, sharded = build_model(cfg, topo, rank)
        self.sharded_full = set(sharded.values())
        self.loss_fn = None
        if topo.pipeline > 1:
            shards = topo.tensor if cfg.parallel.sequence_parallel else 1
            net, self.loss_fn = build_pipeline(
                model, topo.deepspeed_topology(), cfg.train.seed, sequence_shards=shards
            )
            mpu = None  # DeepSpeed takes the pipeline grid (same layout, checked in tests)
        else:
            net, mpu = model, MegatronMPU()
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
        self.before_step = None  # test probe: called with this engine before each optimizer step

    # -- names -----------------------------------------------------------------------------
    def full_param_name(self, local: str) -> str:
        """Local parameter name -> MTPModel name (pipeline indices and `.inner.` removed)."""
        if self.topo.pipeline > 1:
            local = full_name(local, self.cfg.model.trunk_layers)
        return unwrap_name(local)

    def is_sharded(self, local: str) -> bool:
        """Is this local parameter a tensor-parallel shard of a larger full parameter?"""
        return self.full_param_name(local) in self.sharded_full

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
                if self.before_step is not None:
                    self.before_step(self)
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
        optimizer = self.engine.optimizer
        if self.before_step is not None:  # the pipeline steps inside train_batch: wrap step()
            probe, original = self.before_step, optimizer.step

            def step_with_probe(*args, **kwargs):
                probe(self)
                return original(*args, **kwargs)

            optimizer.step = step_with_probe
        try:
            self.engine.train_batch(iter(batches))
        finally:
            optimizer.__dict__.pop("step", None)
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
        summary = None
        if outputs:
            k = len(outputs)
            losses = sum(o.head_losses.double() for o in outputs) / k
            correct = sum(o.head_correct.double() for o in outputs)
            counts = sum(o.head_counts.double() for o in outputs)
            ids = outputs[0].head_ids
            summary = _Summary(ids, losses, correct, counts)
            if self.topo.head > 1:
                summary = _Summary(range(self.cfg.model.n_future),
                                   *gather_head_metrics(summary, self.head_group))  # fmt: skip
        if self.topo.pipeline > 1:
            box = [summary]
            last = dist.get_process_group_ranks(self.pipe_group)[-1]
            dist.broadcast_object_list(box, src=last, group=self.pipe_group)
            summary = box[0]
        parts = (summary.head_losses, summary.head_correct, summary.head_counts)
        stats = torch.cat([p.to(self.device, torch.float64) for p in parts])
        if reduce_dp and self.topo.data > 1:
            dist.all_reduce(stats, group=self.dp_group)
            stats[: self.cfg.model.n_future] /= self.topo.data
        stats = stats.cpu()
        n = self.cfg.model.n_future
        losses, correct, counts = stats[:n], stats[n : 2 * n], stats[2 * n :].clamp(min=1)
        norm = self.engine.get_global_grad_norm() if lr else None
        norm = self._stage0_norm if norm is None and lr else norm
        return StepMetrics(
            loss=float(losses.sum()),
            head_losses=losses.tolist(),
            head_accuracy=(correct / counts).tolist(),
            tokens=tokens,
            grad_norm=float(norm) if norm is not None else float("nan"),
            lr=lr,
        )

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


class _Summary:
    """Per-head sums in the shape gather_head_metrics and the broadcast expect."""

    def __init__(self, head_ids, losses, correct, counts) -> None:
        self.head_ids = tuple(head_ids)
        self.head_losses, self.head_correct, self.head_counts = losses, correct, counts
