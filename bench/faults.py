"""A network that fails: time-to-detect and steps lost when one host's cable is pulled mid-run.

    python bench/faults.py [--timeouts 10,20] [--steps 40] [--after-step 6]

Needs root (network namespaces). Two hosts, each a namespace with one interface (tests/netns.py),
one launchers/torchrun.sh per host (c10d rendezvous on 10.77.0.1, GLOO_SOCKET_IFNAME=eth0), one
worker per host, the tiny launcher recipe (tests/slurm/tiny.yaml: byte tokenizer, d_model 32,
a checkpoint every 2 steps). First an unbroken two-host run gives the reference losses. Then,
for each `parallel.timeout_s`: once `--after-step` is logged and a checkpoint exists, host 1's
bridge port goes down (silence, no error); as soon as a worker dies the port comes back up;
torchrun restarts the group (one restart allowed), which resumes from the last complete
checkpoint and finishes. Per run: seconds from the cut to the first dead worker, the step
logged at the cut, the step resumed from, the steps done twice, whether every step's loss equals
the reference's, and the wall time. A table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import netns  # noqa: E402

RECIPE = netns.REPO / "tests/slurm/tiny.yaml"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def job_args(run_dir: Path, steps: int, timeout_s: float) -> list[str]:
    return [
        str(RECIPE),
        f"run_dir={run_dir}",
        f"data.source={CORPUS}",
        "tracking.enabled=false",
        f"train.max_steps={steps}",
        f"parallel.timeout_s={timeout_s}",
    ]


def unbroken(hosts: list[netns.Host], run_dir: Path, args: list[str]) -> list[dict]:
    procs = [netns.torchrun_on(h, hosts[0], i, len(hosts), args) for i, h in enumerate(hosts)]
    outs = netns.wait_all(procs, timeout=600)
    for proc, out in zip(procs, outs, strict=True):
        if proc.returncode != 0:
            sys.exit(f"the unbroken run failed:\n{out[-4000:]}")
    return netns.read_metrics(run_dir)


def same(got: list[dict], expected: list[dict]) -> bool:
    return [r["step"] for r in got] == [r["step"] for r in expected] and all(
        abs(a["loss"] - b["loss"]) <= 1e-6 for a, b in zip(got, expected, strict=True)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--timeouts", default="10,20", help="parallel.timeout_s values, comma-separated"
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--after-step", type=int, default=6, help="cut once this step is logged")
    a = ap.parse_args()
    timeouts = [float(t) for t in a.timeouts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, netns.hosts(2) as hosts:
        ref_dir = Path(tmp) / "unbroken"
        t0 = time.monotonic()
        reference = unbroken(hosts, ref_dir, job_args(ref_dir, a.steps, max(timeouts)))
        unbroken_s = time.monotonic() - t0
        for timeout_s in timeouts:
            run_dir = Path(tmp) / f"cut-{timeout_s:g}"
            args = job_args(run_dir, a.steps, timeout_s)
            fault = netns.cut_mid_run(hosts, hosts[1], run_dir, args, a.after_step)
            rows.append(
                {
                    "timeout_s": timeout_s,
                    "detect_s": round(fault.detect_s, 2),
                    "cut_at_step": fault.cut_at_step,
                    "resumed_step": fault.resumed_step,
                    "steps_lost": fault.steps_lost,
                    "same_losses": same(netns.read_metrics(run_dir), reference),
                    "wall_s": round(fault.total_s, 1),
                }
            )
    print(f"unbroken two-host run: {a.steps} steps, {unbroken_s:.1f} s")
    cols = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]!s:>12}" for c in cols))
    print(json.dumps({"steps": a.steps, "unbroken_s": round(unbroken_s, 1), "runs": rows}))


if __name__ == "__main__":
    main()
