"""Head-1 bits per byte of a checkpoint on held-out code, against gzip -9 and xz -9e.

    python bench/quality.py --checkpoint runs/tiny-cpu          # 60 files of CPython's tests
    python bench/quality.py --checkpoint RUN --files DIR --limit 10 --context 256
    python bench/quality.py --compressors-only                   # gzip/xz only, no model

`mtp heldout` with --json (mtp_dist/eval/heldout_cli.py): held-out files are CPython's own test
suite by default (the stdlib training corpus leaves it out), every file token scored once by
strided windows of the training context, per-head top-1 accuracy on the same windows, results
added to the training run's MLflow metrics as heldout/*. The last line printed is one JSON object.
"""

from mtp_dist.eval.heldout_cli import bench_main

if __name__ == "__main__":
    bench_main()
