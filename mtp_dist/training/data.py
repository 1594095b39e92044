"""The trainer's data: tokenizer and packed shards, prepared once (by the main rank) per run.

On first run the tokenizer is trained on the corpus (or the byte tokenizer is used) and saved to
<run_dir>/tokenizer; the corpus is packed into webdataset shards under data.shards_dir (default
<run_dir>/data). Later runs and resumes reuse both. Other ranks wait at a barrier, then load.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from ..config import RunConfig
from .runtime import Runtime


def corpus_sources(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(sources, exclude globs) of the configured corpus."""
    if cfg.data.source == "stdlib":
        return [sysconfig.get_paths()["stdlib"]], ["**/test/**", "**/tests/**", "**/idlelib/**"]
    return [cfg.data.source], []


def corpus_files(cfg: RunConfig) -> list[Path]:
    """Files of the corpus for tokenizer training (the builder applies the same globs)."""
    sources, exclude = corpus_sources(cfg)
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_file():
            files.append(source)
            continue
        for pattern in cfg.data.include:
            for path in sorted(source.glob(pattern)):
                rel = path.relative_to(source)
                if path.is_file() and not any(rel.match(x.removeprefix("**/")) for x in exclude):
                    if not any(part in ("test", "tests", "idlelib") for part in rel.parts[:-1]):
                        files.append(path)
    return files


def prepare_tokenizer(cfg: RunConfig, runtime: Runtime):
    from ..tokenizers import ByteTokenizer, load_tokenizer, train_sentencepiece

    if cfg.data.tokenizer_path:
        return load_tokenizer(cfg.data.tokenizer_path)
    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    out = Path(cfg.run_dir) / "tokenizer"
    if runtime.is_main and not (out / "tokenizer.json").is_file():
        print(f"training a sentencepiece tokenizer (vocab {cfg.data.sp_vocab_size}) -> {out}")
        train_sentencepiece(corpus_files(cfg), out, vocab_size=cfg.data.sp_vocab_size)
    runtime.barrier()
    return load_tokenizer(out)


def prepare_shards(cfg: RunConfig, tokenizer, runtime: Runtime) -> Path:
    """Build (main rank, first run) or reuse the packed shards; returns the manifest path."""
    from data_pipeline import build_shards, ensure_stdlib_shards

    out = Path(cfg.data.shards_dir or Path(cfg.run_dir) / "data")
    if runtime.is_main:
        kwargs = dict(val_fraction=cfg.data.val_fraction, seed=cfg.train.seed)
        if cfg.data.source == "stdlib":
            manifest = ensure_stdlib_shards(
                out, tokenizer, cfg.data.seq_len, cfg.model.n_future, **kwargs
            )
        else:
            sources, exclude = corpus_sources(cfg)
            manifest = build_shards(
                sources,
                out,
                tokenizer,
                cfg.data.seq_len,
                cfg.model.n_future,
                include=tuple(cfg.data.include),
                exclude=tuple(exclude),
                **kwargs,
            )
        del manifest
    runtime.barrier()
    return out / "manifest.json"


def make_loaders(cfg: RunConfig, manifest: Path, runtime: Runtime):
    """(train loader: infinite, resumable; val loader: one pass)."""
    from data_pipeline import TokenWindowLoader

    common = dict(
        batch_size=cfg.train.micro_batch_size,
        dp_rank=runtime.dp_rank,
        dp_size=runtime.dp_size,
        seed=cfg.train.seed,
    )
    train = TokenWindowLoader(manifest, "train", num_workers=cfg.data.num_workers, **common)
    val = TokenWindowLoader(manifest, "val", num_workers=0, **common)
    return train, val
