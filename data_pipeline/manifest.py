"""The manifest: what a shard directory contains. The reader and the trainer trust only this.

manifest.json lists, per split, every shard with its sample count, token count, byte size and
sha256; the totals; the tokenizer identity; the window geometry (seq_len, n_future, window,
stride, dtype); the build configuration; and every input that was skipped, with its reason.
It is written last and atomically, so a directory with a manifest is a finished build.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from mtp_dist.files import write_atomic

FORMAT = "mtp_dist.token_windows.v1"
MANIFEST_NAME = "manifest.json"
MAX_SKIP_EXAMPLES = 1000
"""The skip list keeps this many (name, reason, detail) entries; the per-reason counts are exact."""


class ManifestError(ValueError):
    """A manifest is unreadable, of another format, or does not fit the trainer's settings."""


@dataclass
class ShardInfo:
    name: str
    """File name, relative to the manifest's directory."""
    samples: int
    """Windows in the shard."""
    tokens: int
    """Tokens stored (samples * window; includes look-ahead overlap and padding)."""
    bytes: int
    """File size."""
    sha256: str
    """Hex digest of the whole file."""


@dataclass
class SplitInfo:
    shards: list[ShardInfo]
    documents: int
    """Documents packed into this split."""
    stream_tokens: int
    """Tokens of the concatenated stream: document tokens plus one EOS after each document."""
    pad_tokens: int
    """PAD tokens filling the split's last window(s); nowhere else."""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Manifest:
    tokenizer: dict
    """Tokenizer identity: kind, vocab_size, sha256."""
    special_ids: dict
    """{'bos': .., 'eos': .., 'pad': ..}."""
    seq_len: int
    n_future: int
    window: int
    """Tokens per sample: seq_len + n_future."""
    stride: int
    """Distance between consecutive window starts in the stream (= seq_len)."""
    dtype: str
    """numpy dtype of the stored tokens: 'uint16' or 'int32'."""
    splits: dict[str, SplitInfo]
    totals: dict
    """files, documents, duplicates, bytes, tokens, skipped (count per reason)."""
    skipped: list[dict]
    """Up to MAX_SKIP_EXAMPLES entries {'name', 'reason', 'detail'} in input order."""
    config: dict
    """The build settings (sources, globs, seed, ...) and a fingerprint of the listed files."""
    sample_bytes: int = 0
    """Bytes one sample occupies in a tar (header + padded data): lets readers seek in files."""
    format: str = FORMAT
    location: str | None = field(default=None, compare=False)
    """Where this manifest was loaded from or saved to (not serialised)."""
    build_stats: dict = field(default_factory=dict, compare=False)
    """Timing of the build that produced it, e.g. seconds and MB/s (not serialised)."""

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("location")
        data.pop("build_stats")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, location: str | None = None) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ManifestError(f"{location}: format {data.get('format')!r}, expected {FORMAT!r}")
        splits = {
            name: SplitInfo(
                shards=[ShardInfo(**s) for s in split.pop("shards")],
                **split,
            )
            for name, split in data.pop("splits").items()
        }
        return cls(splits=splits, location=location, **data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read a manifest from a local path (file or directory) or an fsspec URL."""
        loc = str(path)
        try:
            if "://" in loc and urlparse(loc).scheme not in ("", "file"):
                import fsspec

                with fsspec.open(loc, "rt") as f:
                    text = f.read()
            else:
                local = Path(loc.removeprefix("file://"))
                if local.is_dir():
                    local = local / MANIFEST_NAME
                loc = str(local)
                text = local.read_text()
        except (OSError, ValueError) as err:
            raise ManifestError(f"cannot read manifest {loc}: {err}") from err
        try:
            return cls.from_json(text, loc)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ManifestError(f"{loc}: not a valid manifest ({err})") from err

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: readers see the old manifest or the new one, never half of one."""
        path = Path(path)
        write_atomic(path, self.to_json())
        self.location = str(path)

    @property
    def base(self) -> str:
        """The directory (or URL prefix) that shard names are relative to."""
        if self.location is None:
            raise ManifestError("manifest has no location; save or load it first")
        return self.location.rsplit("/", 1)[0] if "/" in self.location else "."

    def check_compatible(
        self,
        tokenizer: dict | None = None,
        seq_len: int | None = None,
        n_future: int | None = None,
    ) -> None:
        """Raise ManifestError if the shards were built for another tokenizer or window."""
        where = self.location or "manifest"
        if tokenizer is not None and dict(tokenizer) != self.tokenizer:
            raise ManifestError(
                f"{where}: shards were built with tokenizer {self.tokenizer}, "
                f"but the trainer uses {dict(tokenizer)}; rebuild the shards"
            )
        if seq_len is not None and seq_len != self.seq_len:
            raise ManifestError(f"{where}: shards have seq_len={self.seq_len}, trainer {seq_len}")
        if n_future is not None and n_future != self.n_future:
            raise ManifestError(
                f"{where}: shards have n_future={self.n_future} (window {self.window}), "
                f"trainer n_future={n_future} (window {(seq_len or self.seq_len) + n_future})"
            )
