#!/usr/bin/env bash
# Launch `mtp train` under torchrun on this node: one node, or one node of several.
#
#   launchers/torchrun.sh RECIPE [key=value ...]
#
# One node (a standalone c10d rendezvous on a free local port):
#   NPROC_PER_NODE=2 launchers/torchrun.sh configs/tiny-cpu.yaml run_dir=runs/x
# Several nodes: run the same command on every node with the same MASTER_ADDR/MASTER_PORT
# (an address of node 0, reachable from all nodes) and each node's NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/torchrun.sh configs/code-7b-n4.yaml ...
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE   workers on this node [the GPU count from nvidia-smi, else 1]
#   NNODES           nodes in the job [1]
#   NODE_RANK        this node's index [SLURM_NODEID, else 0]
#   MASTER_ADDR      node 0's address; unset with NNODES=1 means --standalone
#   MASTER_PORT      rendezvous port on MASTER_ADDR [29500]
#   RDZV_BACKEND     c10d (elastic, survives restarts) or static [c10d]
#   RDZV_ID          job id shared by all nodes of one job [SLURM_JOB_ID, else mtp]
#   LOCAL_ADDR       this node's address as the other nodes reach it [unset: torchrun uses
#                    the hostname]. Set it where the hostname does not resolve to that address.
#   MAX_RESTARTS     worker-group restarts after a failure [3]
#   PYTHON           interpreter for torchrun and the workers [python3]
#   TORCHRUN_ARGS    extra torchrun options, split on spaces (e.g. "--log-dir logs --tee 3")
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  [1]: see the note before the exec below
#
# Rendezvous caveat (docs/launching.md): with c10d, the launcher on node 0 must host the
# rendezvous store. torchrun guesses it from the hostname, which goes wrong when several launchers
# share one machine (simulated Slurm nodes) and can race when all start at once, so this script
# says it explicitly: is_host=1 on NODE_RANK 0, is_host=0 elsewhere.
#
# Restarts: torchrun re-runs the same worker command after a failure, so the command always
# carries `--resume`: the trainer continues from the latest complete checkpoint of run_dir, or
# starts from step 0 when there is none (the very first attempt). Point run_dir at a new
# directory for a new run.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

if (($# < 1)); then
    usage 2 >&2
fi
case $1 in
    -h | --help) usage 0 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}

default_nproc() {
    local gpus
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo "${gpus:-0}" | awk '{ print ($1 > 0) ? $1 : 1 }'
}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}

args=(--nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" --monitor-interval 1)
if ((NNODES == 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
    args+=(--standalone)
else
    : "${MASTER_ADDR:?with NNODES > 1 set MASTER_ADDR to an address of node 0}"
    MASTER_PORT=${MASTER_PORT:-29500}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    case $RDZV_BACKEND in
        c10d)
            args+=(--nnodes "$NNODES" --rdzv-backend c10d
                --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-mtp}}"
                --rdzv-conf "is_host=$((NODE_RANK == 0 ? 1 : 0))")
            # The rendezvous publishes each node's address; the workers of rank 0's node host
            # the process group's store there. Without --local-addr it is the hostname.
            if [[ -n ${LOCAL_ADDR:-} ]]; then
                args+=(--local-addr "$LOCAL_ADDR")
            fi
            ;;
        static)
            args+=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
                --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
            ;;
        *)
            echo "torchrun.sh: RDZV_BACKEND must be c10d or static, not '$RDZV_BACKEND'" >&2
            exit 2
            ;;
    esac
fi
if [[ -n ${TORCHRUN_ARGS:-} ]]; then
    read -r -a extra <<<"$TORCHRUN_ARGS"
    args+=("${extra[@]}")
fi

# The workers import this checkout of mtp_dist, whatever is installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Restarts need a fresh store per attempt. By default (torch >= 2.5) the workers share the c10d
# rendezvous store of the agent, which outlives an attempt: after a restart, process-group setup
# reads the dead attempt's addresses ("Gloo connectFullMesh failed ... Connection refused", or a
# hang). pytorch/pytorch#135712; seen here with torch 2.13 (tests/test_faults.py). With this set,
# rank 0 hosts a new store for every attempt.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# SIGUSR1 asks the trainer to checkpoint and exit (Slurm's --signal). Its default action would
# kill the torchrun agent itself, so the agent ignores it; the workers install their own handler.
trap '' USR1
set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m mtp_dist.cli train "$@" --resume
