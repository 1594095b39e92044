"""The trainer's data: tokenizer and packed shards, prepared once (by the main rank) per run.

On first run the tokenizer is trained on the corpus and saved to <run_dir>/tokenizer (or the byte
tokenizer, a saved one in data.tokenizer_path, or with data.tokenizer=hf the Hugging Face
tokenizer files in data.tokenizer_path are used); the corpus is packed into webdataset shards
under data.shards_dir (default <run_dir>/data) by data_pipeline, which reuses an existing build
of the same input and settings.
Other ranks wait at a barrier, then load.

What a failed or interrupted setup leaves is what was completed (a trained tokenizer, shards with
their manifest), for the next attempt to reuse: `remove_unfinished` takes away the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..tokenizers.base import TOKENIZER_JSON  # written last by a trained tokenizer's save()
from ..tracking import why_unwritable
from .runtime import Runtime


def corpus_sources(cfg: RunConfig) -> tuple[list[str], tuple[str, ...]]:
    """(sources, exclude globs) of the configured corpus."""
    from data_pipeline import STDLIB_EXCLUDE, stdlib_root

    if cfg.data.source == "stdlib":
        return [stdlib_root()], STDLIB_EXCLUDE
    return [cfg.data.source], ()


def check_corpus(cfg: RunConfig) -> None:
    """data.source exists and holds files to read (ConfigError otherwise)."""
    from data_pipeline.cli import check_sources

    sources, exclude = corpus_sources(cfg)
    check_sources(sources, cfg.data.include, exclude, key="data.source")


def shards_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.shards_dir or Path(cfg.run_dir) / "data")


def check_paths(cfg: RunConfig) -> None:
    """run_dir and data.shards_dir are (or can be made) directories this process writes in."""
    for key, path in (("run_dir", Path(cfg.run_dir)), ("data.shards_dir", shards_dir(cfg))):
        why = why_unwritable(path)
        if why is not None:
            raise ConfigError(f"{key}={path}: cannot write there ({why})")


def prepared_dirs(cfg: RunConfig) -> dict[Path, str]:
    """What setup writes: each directory, with the file that marks it complete."""
    from data_pipeline.manifest import MANIFEST_NAME

    return {Path(cfg.run_dir) / "tokenizer": TOKENIZER_JSON, shards_dir(cfg): MANIFEST_NAME}


def remove_unfinished(cfg: RunConfig, new: list[Path]) -> list[Path]:
    """After a failed setup: of the directories in `new` (made by this attempt), a prepared one
    without its marker goes (a tokenizer whose training stopped, shards without a manifest),
    then every one left empty. Returns the complete ones kept, which a rerun reuses."""
    kept = []
    for directory, marker in prepared_dirs(cfg).items():
        if directory in new and directory.is_dir():
            if (directory / marker).is_file():
                kept.append(directory)
            else:
                shutil.rmtree(directory, ignore_errors=True)
    for directory in sorted(set(new), key=lambda p: len(p.parts), reverse=True):
        try:
            directory.rmdir()  # only if empty
        except OSError:
            pass
    return kept


def prepare_tokenizer(cfg: RunConfig, runtime: Runtime):
    from data_pipeline.sources import plan_tasks

    from ..config import ConfigError
    from ..tokenizers import ByteTokenizer, build_tokenizer, load_tokenizer
    from ..tokenizers.cli import train_checked

    if cfg.data.tokenizer == "hf":  # a model directory's own files, or a saved 'hf' tokenizer
        if not cfg.data.tokenizer_path:
            raise ConfigError(
                "data.tokenizer=hf needs data.tokenizer_path=DIR (a directory holding "
                "tokenizer.json + tokenizer_config.json, e.g. a Hugging Face model's), or "
                "--init-from RUN (an imported run's own tokenizer)"
            )
        return build_tokenizer("hf", cfg.data.tokenizer_path)
    if cfg.data.tokenizer_path:
        return load_tokenizer(cfg.data.tokenizer_path)
    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    out = Path(cfg.run_dir) / "tokenizer"
    if runtime.is_main and not (out / TOKENIZER_JSON).is_file():
        sources, exclude = corpus_sources(cfg)
        tasks, _, _ = plan_tasks(sources, cfg.data.include, exclude)
        files = [Path(t.path) for t in tasks if t.kind == "file"]
        print(
            f"training a sentencepiece tokenizer (vocab {cfg.data.sp_vocab_size}) on "
            f"{len(files)} files -> {out}"
        )
        vocab = cfg.data.sp_vocab_size
        train_checked(files, out, vocab, f"data.sp_vocab_size={vocab}")
    runtime.barrier()
    return load_tokenizer(out)


def prepare_shards(cfg: RunConfig, tokenizer, runtime: Runtime) -> Path:
    """Build (main rank, first run) or reuse the packed shards; returns the manifest path."""
    from data_pipeline import ensure_shards
    from data_pipeline.manifest import MANIFEST_NAME

    out = shards_dir(cfg)
    if runtime.is_main:
        sources, exclude = corpus_sources(cfg)
        ensure_shards(
            sources,
            out,
            tokenizer,
            cfg.data.seq_len,
            cfg.model.n_future,
            include=tuple(cfg.data.include),
            exclude=tuple(exclude),
            val_fraction=cfg.data.val_fraction,
            seed=cfg.train.seed,
        )
    runtime.barrier()
    return out / MANIFEST_NAME


def make_loaders(cfg: RunConfig, manifest: Path, tokenizer, runtime: Runtime):
    """(train loader: infinite, resumable; val loader: one pass). The reader checks that the
    shards were built with this tokenizer and window."""
    from data_pipeline import ManifestError, TokenWindowLoader

    common = dict(
        batch_size=cfg.train.micro_batch_size,
        dp_rank=runtime.dp_rank,
        dp_size=runtime.dp_size,
        seed=cfg.train.seed,
        tokenizer=tokenizer,
        seq_len=cfg.data.seq_len,
        n_future=cfg.model.n_future,
    )
    train = TokenWindowLoader(manifest, "train", num_workers=cfg.data.num_workers, **common)
    try:
        val = TokenWindowLoader(manifest, "val", num_workers=0, **common)
    except ManifestError as err:  # a corpus too small for a held-out batch: train without
        if runtime.is_main:
            print(f"warning: no validation: {err}")
        val = None
    return train, val
