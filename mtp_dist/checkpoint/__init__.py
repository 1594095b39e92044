"""The checkpoint format, its one home: layout and completion marker, resolving a run or step
directory, reading files with clear errors, loading for inference, consolidating shards.

Training, distributed, inference, eval and export import it; it imports nothing of them
(docs/architecture.md).
"""

from .inference import load_for_inference
from .layout import (
    MARKER,
    CheckpointError,
    check_tokenizer,
    checkpoints_dir,
    complete_checkpoints,
    latest_checkpoint,
    load_file,
    padded_vocab,
    publish,
    read_trainer_state,
    resolve_checkpoint,
    staging_dir,
    write_common,
)
from .shards import LAYOUT_FILE, SHARDS_DIR, consolidate, merge_shards, shard_path

__all__ = [
    "LAYOUT_FILE",
    "MARKER",
    "SHARDS_DIR",
    "CheckpointError",
    "check_tokenizer",
    "checkpoints_dir",
    "complete_checkpoints",
    "consolidate",
    "latest_checkpoint",
    "load_file",
    "load_for_inference",
    "merge_shards",
    "padded_vocab",
    "publish",
    "read_trainer_state",
    "resolve_checkpoint",
    "shard_path",
    "staging_dir",
    "write_common",
]
