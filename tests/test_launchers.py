"""Launchers: launchers/torchrun.sh and launchers/slurm.sbatch.

Fast tier: the scripts run with stand-ins for python and for the Slurm commands, and the tests
check the exact torchrun command each node ends up with (rendezvous, is_host, restarts,
--resume, overrides) and the SIGUSR1 -> checkpoint -> requeue path of the sbatch script.
Distributed tier: a real tiny run through torchrun.sh as two "nodes" on this machine (c10d, both
launchers started at the same instant). One-node runs, restarts and tracking: tests/test_faults.py.
The real Slurm tier is tests/slurm/test_sbatch.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_SH = REPO / "launchers/torchrun.sh"
SBATCH = REPO / "launchers/slurm.sbatch"
RECIPE = REPO / "tests/slurm/tiny.yaml"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID")

# Stand-in for python: records its arguments and the environment torchrun would see.
FAKE_PYTHON = """#!/usr/bin/env bash
python3 - "$@" <<'EOF'
import json, os, sys
keys = ("PYTHONPATH", "MLFLOW_TRACKING_URI", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
rank = os.environ.get("SLURM_NODEID", "x")
with open(os.path.join(os.environ["FAKE_OUT"], f"torchrun-{rank}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
EOF
"""

# Stand-ins for the Slurm commands the sbatch script calls.
FAKE_SLURM = {
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_OUT/calls"
case "$*" in
    "show hostnames "*) printf 'gpu17\\ngpu18\\n' ;;
    "-o show node gpu17") echo "NodeName=gpu17 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=gpu17" ;;
    "requeue "*) ;;
    *) exit 1 ;;
esac
""",
    # srun: run the task command once per node (SLURM_NODEID 0, 1) like the real one would, then,
    # if asked, stay "running" until the step receives SIGUSR1 (sent by the fake scancel).
    "srun": """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_OUT/calls"
echo $$ > "$FAKE_OUT/srun.pid"
while [[ $1 == --* ]]; do shift; done
for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done
if [[ -n ${FAKE_SRUN_HOLD:-} ]]; then
    sleep 60 &
    trap 'kill $!; echo "step got USR1" >> "$FAKE_OUT/calls"; exit 0' USR1
    touch "$FAKE_OUT/holding"
    wait $!
    exit 3
fi
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_OUT/calls"
kill -USR1 "$(cat "$FAKE_OUT/srun.pid")"
""",
}


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    return {**env, **extra}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def fake_torchrun(tmp_path: Path, *args: str, **env: str) -> dict:
    """Run torchrun.sh with the stand-in python; returns what torchrun would have received."""
    fake = write_exe(tmp_path / "fakepython", FAKE_PYTHON)
    run = subprocess.run(
        ["bash", str(TORCHRUN_SH), *args],
        env=clean_env(PYTHON=str(fake), FAKE_OUT=str(tmp_path), **env),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rank = env.get("SLURM_NODEID", "x")
    return json.loads((tmp_path / f"torchrun-{rank}.json").read_text())


def test_single_node_is_standalone_and_always_resumes(tmp_path):
    got = fake_torchrun(tmp_path, "configs/tiny-cpu.yaml", "train.lr=0.1", NPROC_PER_NODE="2")
    argv = got["argv"]
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--rdzv-backend" not in argv
    assert flag(argv, "--nproc-per-node") == "2"
    assert flag(argv, "--max-restarts") == "3"
    entry = argv.index("-m", 2)
    assert argv[entry:] == [
        "-m",
        "mtp_dist.cli",
        "train",
        "configs/tiny-cpu.yaml",
        "train.lr=0.1",
        "--resume",
    ]
    assert got["env"]["PYTHONPATH"].split(":")[0] == str(REPO)
    # A fresh rendezvous store per attempt, or restarts cannot rebuild the process groups.
    assert got["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


@pytest.mark.parametrize("node_rank, is_host", [("0", "1"), ("1", "0")])
def test_multi_node_c10d_names_the_rendezvous_host(tmp_path, node_rank, is_host):
    argv = fake_torchrun(
        tmp_path,
        "r.yaml",
        NNODES="2",
        NODE_RANK=node_rank,
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="29411",
        MAX_RESTARTS="1",
        RDZV_ID="job7",
    )["argv"]
    assert flag(argv, "--nnodes") == "2"
    assert flag(argv, "--rdzv-backend") == "c10d"
    assert flag(argv, "--rdzv-endpoint") == "10.0.0.1:29411"
    assert flag(argv, "--rdzv-id") == "job7"
    assert flag(argv, "--rdzv-conf") == f"is_host={is_host}"
    assert flag(argv, "--max-restarts") == "1"
    assert "--standalone" not in argv and "--node-rank" not in argv


def test_node_rank_defaults_to_slurm_nodeid_and_static_is_available(tmp_path):
    env = dict(NNODES="2", MASTER_ADDR="10.0.0.1", RDZV_BACKEND="static", SLURM_NODEID="1")
    argv = fake_torchrun(tmp_path, "r.yaml", **env)["argv"]
    assert flag(argv, "--node-rank") == "1"
    assert flag(argv, "--master-addr") == "10.0.0.1"
    assert flag(argv, "--master-port") == "29500"
    assert "--rdzv-backend" not in argv


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2"}, "MASTER_ADDR"),
        ({"NNODES": "2", "MASTER_ADDR": "h", "RDZV_BACKEND": "etcd"}, "c10d or static"),
    ],
)
def test_bad_multi_node_settings_fail_with_a_message(tmp_path, env, message):
    run = subprocess.run(
        ["bash", str(TORCHRUN_SH), "r.yaml"],
        env=clean_env(PYTHON="false", **env),
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert message in run.stderr


def run_sbatch_script(tmp_path: Path, hold: bool, *args: str) -> tuple[subprocess.Popen, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        write_exe(bin_dir / name, text)
    env = clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=str(write_exe(tmp_path / "fakepython", FAKE_PYTHON)),
        FAKE_OUT=str(tmp_path),
        MTP_REPO_DIR=str(REPO),
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_JOB_NAME="mtp-train",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[17-18]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_CPUS_PER_TASK="16",
        SLURM_GPUS_PER_NODE="h100:4",
        **({"FAKE_SRUN_HOLD": "1"} if hold else {}),
    )
    proc = subprocess.Popen(
        ["bash", str(SBATCH), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return proc, tmp_path


def test_sbatch_script_launches_torchrun_on_every_node(tmp_path):
    proc, out = run_sbatch_script(tmp_path, False, "configs/code-7b-n4.yaml", "train.lr=2e-4")
    log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, log
    calls = (out / "calls").read_text()
    assert "srun --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1" in calls
    assert "requeue" not in calls and "scancel" not in calls
    run_dir = tmp_path / "runs/mtp-train-4242"
    assert run_dir.is_dir()
    for node, is_host in (("0", "1"), ("1", "0")):
        got = json.loads((out / f"torchrun-{node}.json").read_text())
        argv = got["argv"]
        assert flag(argv, "--nnodes") == "2"
        assert flag(argv, "--nproc-per-node") == "4"  # from --gpus-per-node=h100:4
        assert flag(argv, "--rdzv-endpoint") == "10.9.8.7:24242"  # NodeAddr, not the name
        assert flag(argv, "--rdzv-id") == "4242"
        assert flag(argv, "--rdzv-conf") == f"is_host={is_host}"
        assert argv[argv.index("mtp_dist.cli") :] == [
            "mtp_dist.cli",
            "train",
            "configs/code-7b-n4.yaml",
            f"run_dir={run_dir}",
            "train.lr=2e-4",
            "--resume",
        ]
        assert got["env"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{run_dir}/mlflow.db"


def test_sbatch_script_checkpoints_and_requeues_on_usr1(tmp_path):
    proc, out = run_sbatch_script(tmp_path, True, "configs/tiny-cpu.yaml", "run_dir=ignored")
    deadline = time.monotonic() + 30
    while not (out / "holding").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers before the time limit
    log = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, log
    calls = (out / "calls").read_text().splitlines()
    tail = [c for c in calls if not c.startswith(("scontrol show", "scontrol -o", "srun"))]
    assert tail == ["scancel --signal=USR1 4242", "step got USR1", "scontrol requeue 4242"]


# -- real runs ----------------------------------------------------------------------------------


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.source={CORPUS}", *extra]


def check_finished(run_dir: Path, steps: int = 12) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records)
    marker = run_dir / f"checkpoints/step_{steps:08d}/complete.json"
    assert json.loads(marker.read_text())["dp_size"] == 2
    return records


@pytest.mark.distributed
def test_two_nodes_on_one_machine_c10d_started_together(tmp_path):
    """Two launchers (NODE_RANK 0 and 1, one worker each) started at the same instant: the
    explicit is_host settles who hosts the c10d store (without it, two launchers started at
    the same instant once failed with RendezvousConnectionError)."""
    run_dir = tmp_path / "run"
    env = clean_env(
        NNODES="2",
        NPROC_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29600 + os.getpid() % 300),
        RDZV_ID="two-nodes",
        MAX_RESTARTS="0",
        PYTHON=sys.executable,
    )
    overrides = tiny_overrides(run_dir, "tracking.enabled=false")
    cmd = ["bash", str(TORCHRUN_SH), str(RECIPE), *overrides]
    procs = [
        subprocess.Popen(cmd, env={**env, "NODE_RANK": rank}, stdout=subprocess.PIPE, text=True)
        for rank in ("1", "0")
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    check_finished(run_dir)


# -- launchers/data_build_array.sbatch: a shard build as a job array + a dependent merge ---------

DATA_ARRAY = REPO / "launchers/data_build_array.sbatch"

# Stand-in for sbatch: records the call and prints a job id (1001, 1002, ...). With
# FAKE_SBATCH_RUN set it also runs the job at once, an array's tasks one after another with the
# SLURM_ARRAY_* variables Slurm sets, so the dependent job submitted next finds its parts done.
FAKE_SBATCH = """#!/usr/bin/env bash
echo "sbatch $*" >> "$FAKE_OUT/calls"
id=$((1000 + $(wc -l < "$FAKE_OUT/calls")))
array=
while [[ $1 == --* ]]; do
    case $1 in --array=*) array=${1#--array=} ;; esac
    shift
done
echo "$id"
[[ -n ${FAKE_SBATCH_RUN:-} ]] || exit 0
script=$1
shift
if [[ -z $array ]]; then
    SLURM_JOB_ID=$id bash "$script" "$@" >> "$FAKE_OUT/job-$id.log" 2>&1
    exit
fi
lo=${array%-*}
hi=${array#*-}
for ((i = lo; i <= hi; i++)); do
    SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) \\
        SLURM_ARRAY_TASK_MIN=$lo SLURM_ARRAY_TASK_MAX=$hi SLURM_CPUS_PER_TASK=1 \\
        bash "$script" "$@" >> "$FAKE_OUT/job-$id.log" 2>&1 || exit 1
done
"""

# Stand-in for python: records the arguments of each call (python-0.json, python-1.json, ...).
FAKE_DATA_PYTHON = """#!/usr/bin/env bash
python3 - "$@" <<'EOF'
import json, os, sys
out = os.environ["FAKE_OUT"]
n = sum(name.startswith("python-") for name in os.listdir(out))
with open(os.path.join(out, f"python-{n}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "pythonpath": os.environ.get("PYTHONPATH")}, f)
EOF
"""


def data_array(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_exe(bin_dir / "sbatch", FAKE_SBATCH)
    env.setdefault("PYTHON", str(write_exe(tmp_path / "fakepython", FAKE_DATA_PYTHON)))
    path = f"{bin_dir}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(DATA_ARRAY), *args],
        env=clean_env(PATH=path, FAKE_OUT=str(tmp_path), MTP_REPO_DIR=str(REPO), **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


ARRAY_TASK = dict(SLURM_ARRAY_TASK_COUNT="4", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="3")


def test_data_array_submit_chains_the_merge_after_the_parts(tmp_path):
    build = ["/corpus", "--bytes", "--seq-len", "64", "--n-future", "2", "--include", "**/*.py"]
    env = dict(PARTS="4", OUT="/scratch/data", SBATCH_ARGS="--partition=cpu")
    run = data_array(tmp_path, "submit", *build, **env)
    assert run.returncode == 0, run.stderr
    script = str(DATA_ARRAY)
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"sbatch --parsable --partition=cpu --array=0-3 {script} part {' '.join(build)}",
        "sbatch --parsable --partition=cpu --dependency=afterok:1001 --job-name=mtp-data-merge"
        f" --output=%x-%j.out --error=%x-%j.err {script} merge",
    ]
    assert "job array 1001" in run.stdout and "merge: job 1002" in run.stdout


def test_data_array_task_builds_its_part_and_the_merge_takes_all(tmp_path):
    out = tmp_path / "data"
    env = dict(OUT=str(out), SLURM_CPUS_PER_TASK="8", **ARRAY_TASK)
    run = data_array(tmp_path, "part", "/corpus", "--bytes", SLURM_ARRAY_TASK_ID="2", **env)
    assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "python-0.json").read_text())
    parts = [f"{out}.parts/part-{i:05d}" for i in range(4)]
    build = ["data", "build", "--workers", "8", "/corpus", "--bytes"]
    assert got["argv"] == ["-m", "mtp_dist.cli", *build, "--out", parts[2], "--part", "2/4"]
    assert got["pythonpath"].split(":")[0] == str(REPO)
    run = data_array(tmp_path, "merge", OUT=str(out), PARTS="4")
    assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "python-1.json").read_text())
    assert got["argv"] == ["-m", "mtp_dist.cli", "data", "merge", *parts, "--out", str(out)]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["submit", "/corpus"], {"OUT": "/o"}, "set PARTS"),
        (["submit"], {"OUT": "/o", "PARTS": "2"}, "needs mtp data build's arguments"),
        (["merge"], {"PARTS": "2"}, "set OUT"),
        (["part", "/corpus"], {"OUT": "/o"}, "as a task of a job array"),
        (
            ["part", "/corpus"],
            {"OUT": "/o", "SLURM_ARRAY_TASK_ID": "1", **ARRAY_TASK, "SLURM_ARRAY_TASK_MIN": "1"},
            "the array must be 0-3",
        ),
        (["build"], {"OUT": "/o"}, "usage: data_build_array.sbatch submit|part|merge"),
    ],
)
def test_data_array_refuses_bad_settings_in_one_line(tmp_path, args, env, message):
    run = data_array(tmp_path, *args, **env)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert not (tmp_path / "calls").exists() and not list(tmp_path.glob("python-*.json"))


def test_data_array_end_to_end_equals_a_one_machine_build(tmp_path):
    """The real `mtp data` under the stand-in sbatch: 3 array tasks, then the merge; the result is
    the one-machine build, file for file."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(p for p in CORPUS.glob("*.py") if p.stat().st_size < 12_000)[:8]:
        (corpus / path.name).write_bytes(path.read_bytes())
    build = [str(corpus), "--bytes", "--seq-len", "32", "--n-future", "2", "--shard-mb", "0.02"]
    build += ["--val-fraction", "0.2", "--workers", "1", "--quiet"]
    out = tmp_path / "data"
    env = dict(PARTS="3", OUT=str(out), PYTHON=sys.executable, FAKE_SBATCH_RUN="1")
    run = data_array(tmp_path, "submit", *build, **env)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("job-*.log")))
    assert run.returncode == 0, run.stderr + logs
    parts = sorted(p.name for p in (tmp_path / "data.parts").iterdir())
    assert parts == [f"part-{i:05d}" for i in range(3)]
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "mtp_dist.cli", "data", "build", *build, "--out", str(one)]
    subprocess.run(cmd, env=clean_env(PYTHONPATH=str(REPO)), check=True, timeout=300)
    files = sorted(p.name for p in one.iterdir())
    assert len(files) > 3 and files == sorted(p.name for p in out.iterdir())
    assert all((one / f).read_bytes() == (out / f).read_bytes() for f in files)
