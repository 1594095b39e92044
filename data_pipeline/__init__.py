"""The data pipeline: build packed token shards (`build_shards`, or scaled out: `build_part` on
every machine, then `merge_parts`) and read them back (`TokenWindowLoader`). See docs/data.md
for the format and the guarantees.

    manifest = ensure_stdlib_shards("runs/x/data", tokenizer, seq_len=128, n_future=4)
    loader = TokenWindowLoader(manifest.location, "train", batch_size=8, dp_rank=0, dp_size=1)
    for tokens in loader: ...   # (8, 132) int64
"""

from .builder import (
    STDLIB_EXCLUDE,
    build_shards,
    ensure_shards,
    ensure_stdlib_shards,
    stdlib_root,
)
from .manifest import Manifest, ManifestError, ShardInfo, SplitInfo
from .parts import PartError, PartInfo, build_part, merge_parts
from .sample import sample_texts
from .sources import Limits, glob_regex, list_files

_LAZY = {"ShardError", "TokenWindowLoader"}  # the reader imports torch; `mtp --help` should not


def __getattr__(name: str):
    if name in _LAZY:
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STDLIB_EXCLUDE",
    "Limits",
    "Manifest",
    "ManifestError",
    "PartError",
    "PartInfo",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "TokenWindowLoader",
    "build_part",
    "build_shards",
    "ensure_shards",
    "ensure_stdlib_shards",
    "glob_regex",
    "list_files",
    "merge_parts",
    "sample_texts",
    "stdlib_root",
]
