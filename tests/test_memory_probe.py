"""`allocated_peak` (mtp_dist/training/memory.py) measures the work it is given, however many
times it is called in one process (the profiler's running total is process-wide)."""

from __future__ import annotations

import torch

from mtp_dist.training.memory import allocated_peak


def test_repeated_calls_measure_the_same_work():
    kept = []

    def work():
        x = torch.empty(1024 * 1024, dtype=torch.float32)  # 4 MiB
        kept.append(x + 1)  # 4 MiB more while both live, freed after the profiler stops

    peaks = []
    for _ in range(3):
        peaks.append(allocated_peak(work))
        kept.clear()
    assert peaks[0] == peaks[1] == peaks[2]
    assert abs(peaks[0] - 8 * 2**20) < 2**16
