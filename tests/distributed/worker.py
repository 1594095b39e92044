"""Spawned side of the equivalence tests: runs several layouts in one gloo job.

    python tests/distributed/worker.py SPEC.json

SPEC: {"world": N, "port": P, "out": path, "jobs": [{"name", "parallel": {...}, "train":
{...}, "resume_dp": bool, ...}], "model": {...}, "data": {...}, "batches": path}. One process
group serves every layout in the job (megatron-core import and process start-up are the slow
part), each layout builds its own groups and DeepSpeed engine. Rank 0 writes, per layout: the
first step's loss and gathered gradients, per-step losses, parameters after the steps (MTPModel
names, full shapes), the losses after resuming from the step-`save_at` checkpoint, the
consolidated checkpoint's parameters, and what became of the frozen parameters (`train.freeze`)
on every rank: unchanged by the steps, in no optimizer group, without gradients, and restored
by a resume into an engine whose frozen values were disturbed first.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def make_config(spec: dict, job: dict):
    from mtp_dist.config import load_config

    over = [f"run_dir={job['run_dir']}"]
    for section in ("model", "data", "train"):
        for k, v in {**spec.get(section, {}), **job.get(section, {})}.items():
            over.append(f"{section}.{k}={v}")
    for k, v in job["parallel"].items():
        over.append(f"parallel.{k}={v}")
    return load_config(None, over)


def gathered(engine, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-rank {canonical name: local tensor} -> full tensors (TP joined along the parameter
    table's split dimension; heads and stages merged) on every rank."""
    from mtp_dist.model import parameter_table

    table = parameter_table(engine.cfg.model)
    sharded = {n for n, p in engine.named_parameters() if engine.is_sharded(p)}
    mine = {}
    for name, value in values.items():
        mine[name] = (value.detach().double().cpu(), engine.topo.coord(engine.rank).model,
                      name in sharded)  # fmt: skip
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, dict[int, tuple]] = {}
    for part in everyone:
        for name, (tensor, tp_rank, sharded) in part.items():
            out.setdefault(name, {})[tp_rank] = (tensor, sharded)
    merged = {}
    for name, by_rank in out.items():
        first = next(iter(by_rank.values()))
        if first[1]:
            dim = table[name].split_dim
            merged[name] = torch.cat([by_rank[r][0] for r in sorted(by_rank)], dim=dim)
        else:
            merged[name] = first[0]
    return merged


def local_grads(engine) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients (a frozen one has none, in any ZeRO stage)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.named_parameters():
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p)
        out[name] = torch.zeros_like(p) if g is None else g
    return out


def local_params(engine) -> dict[str, torch.Tensor]:
    from mtp_dist.distributed.checkpointing import full_params

    return full_params(engine)


def capture_first_gradients(engine, into: dict) -> None:
    """Record the first step's gradients (before clipping) into `into`. DeepSpeed's engine
    clips and steps in `_take_model_step`, for the plain and the pipeline schedule alike; the
    test wraps that private method of this one engine instance (test code, not production)."""
    ds = engine.engine
    take_step = ds._take_model_step

    def probe(*args, **kwargs):
        if not into:
            into.update(gathered(engine, local_grads(engine)))
        return take_step(*args, **kwargs)

    ds._take_model_step = probe


def _stored(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank stores of a parameter (ZeRO-3: its partition)."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def frozen_values(engine) -> dict[str, torch.Tensor]:
    return {n: _stored(p).clone() for n, p in engine.named_parameters() if not p.requires_grad}


def _optimizer_params(engine) -> set[int]:
    """ids of the parameters DeepSpeed's optimizer (any ZeRO stage) keeps state for."""
    opt = engine.engine.optimizer
    for attr in ("bit16_groups", "fp16_groups"):  # ZeRO 1/2; ZeRO 3
        groups = getattr(opt, attr, None)
        if groups is not None:
            return {id(p) for group in groups for p in group}
    return {id(p) for group in opt.param_groups for p in group["params"]}


def frozen_report(engine, start: dict[str, torch.Tensor], key: str) -> dict:
    """Over all ranks: the frozen names; those whose stored value differs (bitwise) from
    `start`; those in an optimizer group; those holding a gradient. Keys prefixed by `key`."""
    named = engine.named_parameters()
    in_opt = _optimizer_params(engine)
    mine = {
        "frozen": {n for n, p in named if not p.requires_grad},
        "changed": {n for n, p in named if n in start and not torch.equal(_stored(p), start[n])},
        "in_optimizer": {n for n, p in named if not p.requires_grad and id(p) in in_opt},
        "with_grad": {n for n, p in named if not p.requires_grad and p.grad is not None},
    }
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {f"{key}{k}": sorted(set().union(*(r[k] for r in everyone))) for k in mine}


def disturb_frozen(engine) -> None:
    """Move every frozen parameter, so that a resume must restore them to pass."""
    with torch.no_grad():
        for _, p in engine.named_parameters():
            if not p.requires_grad:
                _stored(p).add_(1.0)


def my_rows(batch: torch.Tensor, engine) -> torch.Tensor:
    d, rows = engine.topo.coord(engine.rank).data, engine.cfg.train.micro_batch_size
    return batch[d * rows : (d + 1) * rows]


def run_layout(rank: int, world: int, spec: dict, job: dict, batches: torch.Tensor) -> dict:
    from mtp_dist.distributed import LaunchEnv
    from mtp_dist.distributed.runtime import DistributedRuntime

    cfg = make_config(spec, job)
    runtime = DistributedRuntime(cfg, LaunchEnv(rank, world, 0, "127.0.0.1", spec["port"]))
    result: dict = {"name": job["name"]}
    gas = cfg.train.grad_accum_steps
    steps = job.get("steps", 3)
    save_at = job.get("save_at")
    if job.get("resume_from"):  # resume another job's checkpoint (e.g. another dp size)
        engine = runtime.build_engine(cfg)
        engine.load(Path(job["resume_from"]))
        resumed = []
        for s in range(save_at, steps):
            micro = [my_rows(batches[s * gas + k], engine) for k in range(gas)]
            resumed.append(engine.train_step(micro).head_losses)
        return {"name": job["name"], "resumed": resumed}
    engine = runtime.build_engine(cfg)
    # What reached the engine of the options the layout asked for (layouts.OPTIONS).
    result["applied"] = {"loss_chunk": cfg.model.loss_chunk, "recomputed": engine.recomputed}
    start = frozen_values(engine)
    grads: dict = {}
    capture_first_gradients(engine, grads)
    run_dir = Path(job["run_dir"])
    losses, norms = [], []
    for s in range(steps):
        m = engine.train_step([my_rows(batches[s * gas + k], engine) for k in range(gas)])
        losses.append(m.head_losses)
        norms.append(m.grad_norm)
        if save_at == s + 1:
            ckpt = run_dir / "ckpt"
            if rank == 0:
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / "config.yaml").write_text(_yaml(cfg))
            dist.barrier()
            engine.save(ckpt)
            if rank == 0:
                (ckpt / "complete.json").write_text("{}")
            result["params"] = gathered(engine, local_params(engine))
    result.update(losses=losses, grads=grads, norms=norms)
    result.update(frozen_report(engine, start, ""))
    if "params" not in result:
        result["params"] = gathered(engine, local_params(engine))
    if save_at:
        fresh = runtime.build_engine(cfg)
        disturb_frozen(fresh)
        fresh.load(run_dir / "ckpt")
        result.update(frozen_report(fresh, start, "resumed_"))
        resumed = []
        for s in range(save_at, steps):
            micro = [my_rows(batches[s * gas + k], fresh) for k in range(gas)]
            resumed.append(fresh.train_step(micro).head_losses)
        result["resumed"] = resumed
        if rank == 0:
            from mtp_dist.checkpoint import consolidate

            out = consolidate(run_dir / "ckpt", run_dir / "consolidated")
            result["consolidated"] = torch.load(out / "model.pt")
    if job.get("nan_check"):  # a non-finite loss: every rank skips, nothing is stepped
        before = engine.engine.global_steps
        with torch.no_grad():
            for name, param in engine.named_parameters():
                if name == "embed.weight":
                    param.fill_(float("nan"))
        m = engine.train_step([my_rows(batches[k], engine) for k in range(gas)])
        result["nan"] = {"skipped": m.skipped, "why": m.extra.get("why"),
                         "stepped": engine.engine.global_steps - before}  # fmt: skip
    runtime.barrier()
    return result


def _yaml(cfg) -> str:
    from mtp_dist.config import to_yaml

    return to_yaml(cfg)


def main_rank(rank: int, world: int, spec: dict) -> None:
    torch.set_num_threads(1)
    batches = torch.load(spec["batches"])
    results = []
    for job in spec["jobs"]:
        try:
            results.append(run_layout(rank, world, spec, job, batches))
        except Exception as err:  # reported to the test, which fails naming the layout
            results.append({"name": job["name"], "error": f"{err!r}\n{traceback.format_exc()}"})
            if dist.is_initialized():
                break  # the other ranks may be stuck in a collective: stop here
    if rank == 0:
        torch.save(results, spec["out"])
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    tempfile.tempdir = spec.get("tmp", tempfile.gettempdir())
    torch.multiprocessing.spawn(main_rank, args=(spec["world"], spec), nprocs=spec["world"])


if __name__ == "__main__":
    main()
