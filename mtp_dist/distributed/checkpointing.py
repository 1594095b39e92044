"""Distributed checkpoints: DeepSpeed's own state plus layout-free model shards, written and
resumed by every rank (the files' layout, and consolidation, live in mtp_dist/checkpoint/shards.py).

Resume loads DeepSpeed's state: exact (optimizer moments, step, schedule). A different
data-parallel size works for ZeRO 0 (replicated state), ZeRO 1/2 (DeepSpeed loads module,
scheduler and step; we re-partition the moments from the layout-free shards) and ZeRO-3
(DeepSpeed 0.19.8 cannot re-split its own ZeRO-3 partitions without its universal-checkpoint
conversion, so weights and moments come from the layout-free shards, and schedule and step from
DeepSpeed's data-parallel-rank-0 state file). `mtp_dist.checkpoint.consolidate` merges
the model shards into the single-process `model.pt` that `mtp generate` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import LAYOUT_FILE, CheckpointError, load_file, shard_path

TAG = "state"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _layout(engine) -> dict:
    t = engine.topo
    return {
        "world_size": t.world_size,
        "tensor": t.tensor,
        "pipeline": t.pipeline,
        "head": t.head,
        "data": t.data,
        "zero_stage": engine.cfg.parallel.zero_stage,
    }


def full_params(engine) -> dict[str, torch.Tensor]:
    """This rank's parameters, gathered over data parallelism (a collective over the dp group:
    ZeRO keeps fp32 master weights partitioned), keyed by MTPModel name; shards stay shards.
    Frozen parameters (`train.freeze`) have no master weights: their own values, which ZeRO-3
    still partitions (it gathers them for the forward like any weight), gathered whole here."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    partitioned = []
    for name, param in engine.named_parameters():
        value = safe_get_full_fp32_param(param)
        if value is None and hasattr(param, "ds_id"):
            partitioned.append((name, param))
            out[name] = None  # filled below, in the model's order
            continue
        out[name] = (param.data if value is None else value).cpu().clone()
    if partitioned:
        with deepspeed.zero.GatheredParameters([p for _, p in partitioned]):
            for name, param in partitioned:
                out[name] = param.data.cpu().clone()
    return out


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters that have optimizer state (all but the frozen ones)."""
    return [(n, p) for n, p in engine.named_parameters() if p.requires_grad]


def full_moments(engine) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW moments per trainable parameter, gathered over data parallelism (collective), by
    MTPModel name: what a resume under another data-parallel size re-partitions. A frozen
    parameter has none."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MOMENTS}
    plain = engine.cfg.parallel.zero_stage == 0
    zero = engine.engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 link parameters to their optimizer-state fragments once, after the first
        # param group's first step, when the later groups have no state yet (0.19.8): relink.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in _trainable(engine):
        for key in MOMENTS:
            if plain:
                value = engine.engine.optimizer.state.get(param, {}).get(key)
            else:
                value = safe_get_full_optimizer_state(param, key)
            value = torch.zeros_like(param) if value is None else value
            out[key][name] = value.detach().cpu().clone()
    return out


def save(engine, directory: Path) -> None:
    """Every rank calls this (DeepSpeed's save is collective)."""
    engine.engine.save_checkpoint(str(directory / "deepspeed"), tag=TAG, save_latest=False)
    params = full_params(engine)
    moments = full_moments(engine) if engine.engine.global_steps > 0 else None
    coord = engine.topo.coord(engine.rank)
    if coord.data == 0:
        shard = {
            "params": params,
            "moments": moments,
            "sharded": sorted(n for n, p in engine.named_parameters() if engine.is_sharded(p)),
            "tp_rank": coord.model,
            "tp_size": engine.topo.tensor,
        }
        path = shard_path(directory, coord.pipe, coord.model)
        path.parent.mkdir(exist_ok=True)
        torch.save(shard, path)
    if engine.rank == 0:
        (directory / LAYOUT_FILE).write_text(json.dumps(_layout(engine)))
    dist.barrier()


def load(engine, directory: Path) -> None:
    saved = json.loads((directory / LAYOUT_FILE).read_text())
    now = _layout(engine)
    same_model_layout = all(saved[k] == now[k] for k in ("tensor", "pipeline", "head"))
    if not same_model_layout or saved["zero_stage"] != now["zero_stage"]:
        raise CheckpointError(
            f"{directory} was written with layout {saved}, this run is {now}: only the "
            "data-parallel size may change on resume (consolidate it with `mtp checkpoint "
            "consolidate` and start a new run from the weights otherwise)"
        )
    if saved["data"] != now["data"] and now["zero_stage"] == 3:
        _resume_zero3_repartitioned(engine, directory)
        return
    repartition = saved["data"] != now["data"] and now["zero_stage"] in (1, 2)
    # ZeRO 1/2 partitions of the optimizer state are per data-parallel rank; under a new dp
    # size DeepSpeed loads module, scheduler and step, and we re-partition the moments from
    # the layout-free shards (DeepSpeed's elastic path expects a param-group 'step' that
    # torch's AdamW does not keep).
    path, _ = engine.engine.load_checkpoint(
        str(directory / "deepspeed"),
        tag=TAG,
        load_optimizer_states=not repartition,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint under {directory / 'deepspeed'}")
    if repartition:
        _restore_moments(engine, directory)


def _own_shard(engine, directory: Path) -> dict:
    coord = engine.topo.coord(engine.rank)
    path = shard_path(directory, coord.pipe, coord.model)
    return load_file(path, map_location="cpu", weights_only=False)


def _empty_adam_state(zero, flats: list[torch.Tensor], steps: int) -> None:
    """torch AdamW creates its state at the first step; a resume that did not load DeepSpeed's
    optimizer state creates it (at the restored step) so the moments can be written into it."""
    for flat in flats:
        zero.optimizer.state[flat] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }


def _set_lr_from_scheduler(engine) -> None:
    """LambdaLR.load_state_dict restores the schedule position but not the groups' lr, which the
    optimizer state (not loaded) would have carried."""
    scheduler = engine.engine.lr_scheduler
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _set_master_weights_and_moments(engine, shard: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for name, param in _trainable(engine):  # frozen ones: no master weights, no moments
        device = param.device
        safe_set_full_fp32_param(param, shard["params"][name].to(device))
        if shard["moments"] is not None:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, shard["moments"][key][name].to(device), key)


def _restore_moments(engine, directory: Path) -> None:
    """ZeRO 1/2 under a new data-parallel size, after DeepSpeed loaded module and schedule."""
    zero = engine.engine.optimizer
    _set_lr_from_scheduler(engine)
    _empty_adam_state(zero, zero.single_partition_of_fp32_groups, engine.engine.global_steps)
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    _set_master_weights_and_moments(engine, _own_shard(engine, directory))


def _resume_zero3_repartitioned(engine, directory: Path) -> None:
    """ZeRO-3 under a new data-parallel size, without DeepSpeed's load_checkpoint (it would look
    for this rank's own ZeRO-3 partition file, which a larger data-parallel size lacks and a
    smaller one would misread). Schedule and step: from data-parallel rank 0's state file, the
    same on every rank. Module weights: set whole inside GatheredParameters (re-partitioned on
    exit). fp32 master weights and AdamW moments: through DeepSpeed's fragment API."""
    import deepspeed

    coord = engine.topo.coord(engine.rank)
    state_file = (
        directory / "deepspeed" / TAG / f"zero_pp_rank_0_mp_rank_{coord.model:02d}_model_states.pt"
    )
    state = load_file(state_file, map_location="cpu", weights_only=False)
    ds = engine.engine
    ds.lr_scheduler.load_state_dict(state["lr_scheduler"])
    ds.global_steps = state["global_steps"]
    ds.global_samples = state.get("global_samples", ds.global_steps * ds.train_batch_size())
    ds.skipped_steps = state["skipped_steps"]
    _set_lr_from_scheduler(engine)
    shard = _own_shard(engine, directory)
    params = engine.named_parameters()
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
        with torch.no_grad():
            for name, param in params:  # every rank writes; data-parallel rank 0's is broadcast
                param.data.copy_(shard["params"][name].to(param.dtype))
    _empty_adam_state(ds.optimizer, ds.optimizer.fp32_partitioned_groups_flat, ds.global_steps)
    _set_master_weights_and_moments(engine, shard)
