"""A distributed checkpoint's layout-free model shards, and consolidating them (no process group).

Inside a distributed checkpoint directory (written by mtp_dist.distributed.checkpointing):

    deepspeed/state/...          DeepSpeed's checkpoint (module, ZeRO partitions, scheduler)
    model_shards/pp{P}_mp{M}.pt  one (pipeline stage, model rank) position's parameters, full
                                 over data parallelism, under canonical names, in fp32/fp64:
                                 {"params": {name: tensor}, "moments": {"exp_avg": {...},
                                 "exp_avg_sq": {...}} or None, "sharded": [names that are
                                 tensor-parallel slices], "tp_rank": M, "tp_size": T}
    layout.json                  the topology and ZeRO stage that wrote it

`consolidate` joins the slices along each parameter's split dimension (from the parameter
table), collects heads and pipeline stages, and writes the single-process `model.pt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import load_config
from ..files import copy_file, copy_tree
from .layout import MARKER, CheckpointError, load_file, resolve_checkpoint

SHARDS_DIR = "model_shards"
LAYOUT_FILE = "layout.json"


def shard_path(directory: Path, pipe: int, model: int) -> Path:
    return directory / SHARDS_DIR / f"pp{pipe:02d}_mp{model:02d}.pt"


def merge_shards(directory: Path) -> dict[str, torch.Tensor]:
    """The single-process state dict from a checkpoint's model shards."""
    from ..model import parameter_table

    files = sorted((directory / SHARDS_DIR).glob("pp*_mp*.pt"))
    if not files:
        raise CheckpointError(f"{directory} has no {SHARDS_DIR}/: not a distributed checkpoint")
    table = parameter_table(load_config(directory / "config.yaml").model)
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    sharded: set[str] = set()
    for f in files:
        shard = load_file(f, map_location="cpu", weights_only=False)
        sharded.update(shard["sharded"])
        for name, tensor in shard["params"].items():
            pieces.setdefault(name, {})[shard["tp_rank"]] = tensor
    try:
        table.check_names(pieces, f"the shards of {directory}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    full = {}
    for name, by_rank in pieces.items():
        if name in sharded:
            dim = table[name].split_dim
            full[name] = torch.cat([by_rank[r] for r in sorted(by_rank)], dim=dim)
        else:
            full[name] = next(iter(by_rank.values()))  # replicated: every copy is the same
        if tuple(full[name].shape) != table[name].shape:
            raise CheckpointError(
                f"the shards of {directory} join {name} to shape {tuple(full[name].shape)}, "
                f"the model wants {table[name].shape}"
            )
    return full


def consolidate(source: str | Path, out: str | Path) -> Path:
    """Write a single-process checkpoint (model.pt, config.yaml, tokenizer/, marker) from a
    distributed one (a checkpoint directory or a run directory: its latest checkpoint)."""
    ckpt = resolve_checkpoint(source)
    out = Path(out)
    state = {k: v.float() for k, v in merge_shards(ckpt).items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "model.pt")
    # Copies with the umask's modes, not the source's: the run may be a colleague's.
    copy_file(ckpt / "config.yaml", out / "config.yaml")
    if (ckpt / "tokenizer").is_dir():
        copy_tree(ckpt / "tokenizer", out / "tokenizer")
    if (ckpt / "trainer.pt").is_file():
        copy_file(ckpt / "trainer.pt", out / "trainer.pt")
    meta = json.loads((ckpt / MARKER).read_text()) if (ckpt / MARKER).is_file() else {}
    (out / MARKER).write_text(json.dumps({**meta, "consolidated_from": str(ckpt)}))
    return out
