"""The checkpoint format, its one home: layout and completion marker, resolving a run or step
directory, reading files with clear errors, loading for inference, consolidating shards.

Training, distributed, inference, eval and export import it; it imports nothing of them
(docs/architecture.md). Names are imported on first use (as in mtp_dist.inference), so that
`mtp checkpoint --help` does not pay for importing torch.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "load_for_inference": "inference",
    "MARKER": "layout",
    "CheckpointError": "layout",
    "check_tokenizer": "layout",
    "checkpoints_dir": "layout",
    "complete_checkpoints": "layout",
    "latest_checkpoint": "layout",
    "load_file": "layout",
    "padded_vocab": "layout",
    "publish": "layout",
    "read_trainer_state": "layout",
    "resolve_checkpoint": "layout",
    "staging_dir": "layout",
    "write_common": "layout",
    "LAYOUT_FILE": "shards",
    "SHARDS_DIR": "shards",
    "consolidate": "shards",
    "merge_shards": "shards",
    "shard_path": "shards",
    "CheckpointWeights": "weights",
    "check_state": "weights",
    "read_weights": "weights",
    "export_hf": "hf",
    "export_meta": "meta",
    "import_meta": "meta",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
