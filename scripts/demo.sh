#!/usr/bin/env bash
# The main job on the embedded default: set up, train the tiny-cpu n=4 code model on this
# interpreter's standard library (no download, no GPU), then complete a Python prompt with it.
# Re-running continues (or, once finished, reuses) the run in runs/tiny-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mtp train configs/tiny-cpu.yaml --resume "$@"
# The prompt with its completion, a line saying what decoding runs with (precision, whether
# this CPU computes bf16 natively, whether the step is compiled), then one line per mode: plain
# greedy and self-speculative decoding (speed, tokens per forward, whether the two texts are
# identical, and, where drafting does not pay on this machine, the measured step cost that says
# why: n_draft=auto then decodes plainly).
mtp generate --checkpoint runs/tiny-cpu --prompt $'def fibonacci(n):\n    ' --max-tokens 64 --compare
# Bits per byte on 10 held-out files (CPython's own tests, never trained on) against gzip -9:
# the one-line verdict (`mtp heldout --checkpoint runs/tiny-cpu` prints the whole table).
mtp heldout --checkpoint runs/tiny-cpu --limit 10 --threads 2 | tail -n 1
