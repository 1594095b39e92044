"""CPU thread defaults that survive a busy machine: OpenMP threads sleep, not spin, when idle.

torch's CPU build runs its parallel ops on GNU OpenMP (libgomp, see
`torch.__config__.parallel_info()`; MKL threads through the same libgomp). By default an idle
libgomp thread spins for about 3 ms at every barrier before it sleeps. When another process
holds one of the cores, the thread that shares that core spins through its time slices while its
partner waits for it, op after op: on the 2-core VM the tiny-cpu training step went from ~0.35 s
alone to 1.1-16 s (bench/threads.py; docs/benchmarks.md, "CPU threads under contention"). With
`OMP_WAIT_POLICY=PASSIVE` an idle thread sleeps at once (likely why it fares better: the
scheduler runs a waking sleeper soon, next to a CPU hog), and the step stayed within 0.6-1.5 s
busy. The price is a wake-up per parallel region when the machine is free: 0.71-0.83x the old
speed alone (best of 3 rounds). One thread (`OMP_NUM_THREADS=1`) also avoids the worst, but was
slower alone (0.57x) and no faster busy.

The thread count is left as it is: torch already takes it from the process's CPU affinity
(`taskset -c 0 python -c "import torch; print(torch.get_num_threads())"` prints 1), and
torchrun sets `OMP_NUM_THREADS=1` where several workers share a node.

The rule, applied by `mtp_dist.cli.main` before any command imports torch (libgomp reads its
environment once, when torch loads it); workers inherit it through the environment (DataLoader
workers, `mtp repro --jobs` and `mtp data build` spawned processes, torchrun's workers, which
run `mtp_dist.cli` themselves): a user's own choice always wins, so nothing is set when any
wait setting of either OpenMP runtime is already in the environment (`OMP_WAIT_POLICY`,
libgomp's `GOMP_SPINCOUNT`, Intel OpenMP's `KMP_BLOCKTIME` / `KMP_LIBRARY`).
`GOMP_SPINCOUNT=300000` (libgomp's own default) brings the old behaviour back, e.g. on a
machine of one's own; `OMP_WAIT_POLICY=ACTIVE` spins without ever sleeping.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
# Any one of these is the user's own wait policy, for libgomp or Intel's OpenMP (whose
# OMP_WAIT_POLICY=PASSIVE means KMP_BLOCKTIME=0): then none of DEFAULTS is set.
USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")


def apply_thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the CPU thread defaults in `environ` (default: this process's environment, which
    its children inherit) unless the user chose a wait policy; return what was set.

    Effective only before torch is first imported in the process."""
    environ = os.environ if environ is None else environ
    if any(key in environ for key in USER_WAIT_SETTINGS):
        return {}
    environ.update(DEFAULTS)
    return dict(DEFAULTS)
