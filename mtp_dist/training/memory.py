"""The peak of live tensor bytes during a piece of work, on any device torch profiles.

The CPU counterpart of a GPU's `torch.cuda.max_memory_allocated`: tensors only, no allocator
slack and nothing allocated outside torch (gloo's or DeepSpeed's own buffers). The resident set
(VmHWM) counts what glibc keeps and only the pages a tensor has touched, so it differs from
this in both directions (docs/benchmarks.md, "The planner against measured runs").
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path


def allocated_peak(work: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors `work()` holds at once beyond those alive when it starts
    (weights, optimizer state and anything else made before are not in it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    # The trace's memory events carry the running total in allocation order; the profiler's
    # own event list aggregates them per operator and loses that order.
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    mem = [e["args"] for e in events
           if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]  # fmt: skip
    if not mem:
        return 0
    # The running total is process-wide: it still counts what an earlier profiled piece of
    # work allocated and freed after its profiler stopped. What it held before this work's
    # first event is the baseline (a second call in one process read 16 MB for 12 MB of work).
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in mem) - start)
