"""A network that fails: time-to-detect and steps lost when one host's cable is pulled mid-run.

    python bench/faults.py [--timeouts 10,20] [--steps 40] [--after-step 6] [--keep DIR]

Needs root (network namespaces). Two hosts, each a namespace with one interface (tests/netns.py),
one launchers/torchrun.sh per host (c10d rendezvous on 10.77.0.1, GLOO_SOCKET_IFNAME=eth0), one
worker per host, the tiny launcher recipe (tests/slurm/tiny.yaml: byte tokenizer, d_model 32,
a checkpoint every 2 steps). First an unbroken two-host run gives the reference losses. Then,
for each `parallel.timeout_s`: once `--after-step` is logged and a checkpoint exists, host 1's
bridge port goes down (silence, no error); once a worker has died and the port has been down at
least `timeout_s`, it comes back up; torchrun restarts the group (one restart allowed), which
resumes from the last complete checkpoint and finishes (`netns.cut_mid_run`; torchrun's
`--log-dir --tee 3` worker logs per attempt show the resume, whichever host rank 0 is on).
Per run: seconds from the cut to the first dead worker, and whether that is within timeout_s +
DETECT_MARGIN_S; the step logged at the cut and at the failure; the latest complete checkpoint
at the failure and the step resumed from; the steps done twice; whether every step's loss equals
the reference's; the wall time. A table, then one JSON object as the last line (`ok`: every
check held; the exit status is 1 otherwise).
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


# How far past parallel.timeout_s the first worker may die: its unwinding and exit, and the
# watcher's polling, on a loaded 2-core machine (tests/test_multihost.py uses the same bound).
DETECT_MARGIN_S = 15.0


def cut_run(
    hosts: list[netns.Host],
    run_dir: Path,
    args: list[str],
    after: int,
    timeout_s: float,
    reference: list[dict],
) -> dict:
    fault = netns.cut_mid_run(hosts, hosts[1], run_dir, args, after, hold_s=timeout_s)
    return {
        "timeout_s": timeout_s,
        "time_to_detect_s": round(fault.detect_s, 2),
        "detected_in_bound": fault.detect_s <= timeout_s + DETECT_MARGIN_S,
        "port_down_s": round(fault.down_s, 2),
        "restart_s": None if fault.restart_s is None else round(fault.restart_s, 1),
        "cut_at_step": fault.cut_at_step,
        "failed_at_step": fault.failed_at_step,
        "checkpoint_at_failure": fault.checkpoint_at_failure,
        "resumed_from": fault.resumed_step,
        "steps_lost": fault.steps_lost,
        "attempts": fault.attempts,
        "identical_to_unbroken": same(netns.read_metrics(run_dir), reference),
        "wall_s": round(fault.total_s, 1),
    }


def ok(row: dict) -> bool:
    """The run did what the scenario asks: failed within the bound, restarted once, resumed from
    the last complete checkpoint, and ended with the unbroken run's losses."""
    return (
        "error" not in row
        and row["detected_in_bound"]
        and row["attempts"] == 2
        and row["resumed_from"] == row["checkpoint_at_failure"]
        and row["identical_to_unbroken"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeouts", default="10", help="parallel.timeout_s values, comma-separated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--after-step", type=int, default=6, help="cut once this step is logged")
    ap.add_argument("--keep", type=Path, help="keep run dirs and logs here (default: a temp dir)")
    a = ap.parse_args()
    timeouts = [float(t) for t in a.timeouts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, netns.hosts(2) as hosts:
        root = a.keep or Path(tmp)
        ref_dir = root / "unbroken"
        t0 = time.monotonic()
        reference = unbroken(hosts, ref_dir, job_args(ref_dir, a.steps, max(timeouts)))
        unbroken_s = time.monotonic() - t0
        for timeout_s in timeouts:
            run_dir = root / f"cut-{timeout_s:g}"
            args = job_args(run_dir, a.steps, timeout_s)
            try:
                rows.append(cut_run(hosts, run_dir, args, a.after_step, timeout_s, reference))
            except RuntimeError as e:
                rows.append({"timeout_s": timeout_s, "error": str(e)[-2000:]})
    print(f"unbroken two-host run: {a.steps} steps, {unbroken_s:.1f} s")
    cols = list(dict.fromkeys(c for row in rows for c in row if c != "error"))
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in cols))
        if "error" in row:
            print(f"timeout_s {row['timeout_s']:g} failed: {row['error']}")
    result = {
        "ok": all(ok(r) for r in rows),
        "steps": a.steps,
        "after_step": a.after_step,
        "detect_margin_s": DETECT_MARGIN_S,
        "unbroken_s": round(unbroken_s, 1),
        "runs": rows,
    }
    if len(rows) == 1:  # one run: its numbers at the top level too
        result = {**rows[0], **result}
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
