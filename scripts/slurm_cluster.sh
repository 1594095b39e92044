#!/usr/bin/env bash
# A local Slurm cluster for the `slurm` test tier: munge + slurmctld + two simulated nodes
# (node1, node2: two slurmd daemons on 127.0.0.1; docs/launching.md describes the setup).
#
#   bash scripts/slurm_cluster.sh start    # install (apt, idempotent), configure, start, wait idle
#   bash scripts/slurm_cluster.sh status   # daemons and `sinfo`
#   bash scripts/slurm_cluster.sh stop     # stop the daemons this script started (by PID)
#
# Needs root (daemons run as root, SlurmUser=root). Writes /etc/slurm/slurm.conf (the path every
# Slurm client reads) and refuses to overwrite one it did not write. State, logs and PID files go
# to $MTP_SLURM_DIR (default /tmp/mtp-slurm). Accounting is off: use squeue/scontrol, not sacct.
# Each simulated node has CPUS_PER_NODE CPUs (default: what `slurmd -C` reports), so one task
# per node with --cpus-per-task up to that many fits; torchrun's workers run inside that task.
set -euo pipefail

STATE_DIR=${MTP_SLURM_DIR:-/tmp/mtp-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by mtp_dist scripts/slurm_cluster.sh"
NODES=(node1 node2)
FIRST_PORT=17001
MUNGE_PID=/run/munge/munged.pid

log() { printf 'slurm_cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if ((${#missing[@]} == 0)); then
        return
    fi
    log "installing ${missing[*]}"
    # An install can fail on a stale package index: update it once and retry.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    fi
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if pid_alive "$MUNGE_PID"; then
        return
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create >/dev/null
    fi
    runuser -u munge -- munged
    mkdir -p "$STATE_DIR"
    touch "$STATE_DIR/munged.ours" # stop only the munged this script started
    munge -n | unmunge >/dev/null || die "munge does not round-trip a credential"
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away first"
    fi
    local host cpus last_port
    host=$(hostname)
    cpus=${CPUS_PER_NODE:-$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\) .*/\1/p')}
    [[ -n $cpus ]] || die "could not read CPUs from 'slurmd -C'"
    last_port=$((FIRST_PORT + ${#NODES[@]} - 1))
    mkdir -p "$STATE_DIR/ctld"
    cat >"$CONF" <<EOF
$MARKER
ClusterName=mtplocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credential lifetime; also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=5
InactiveLimit=0
SlurmdTimeout=120
NodeName=node[1-${#NODES[@]}] NodeHostname=$host NodeAddr=127.0.0.1 Port=$FIRST_PORT-$last_port CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local deadline=$((SECONDS + 60)) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
        if [[ $(grep -c ' idle$' <<<"$states") -eq ${#NODES[@]} ]]; then
            log "nodes idle: $(tr '\n' ' ' <<<"$states")"
            return
        fi
        sleep 1
    done
    die "nodes not idle after 60 s: ${states:-no answer from slurmctld} (logs: $STATE_DIR)"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "run as root (the daemons run as root here)"
    install_packages
    mkdir -p "$STATE_DIR"
    start_munge
    write_conf
    if pid_alive "$STATE_DIR/slurmctld.pid"; then
        scontrol reconfigure # pick up a rewritten slurm.conf
    else
        slurmctld -i
    fi
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE_DIR/slurmd-$node"
        if ! pid_alive "$STATE_DIR/slurmd-$node.pid"; then
            slurmd -N "$node"
        fi
    done
    wait_idle
}

stop_pidfile() {
    local file=$1 name=$2 pid
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $name ($pid)"; return 0; }
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    log "killed $name ($pid)"
}

stop() {
    local node
    for node in "${NODES[@]}"; do
        stop_pidfile "$STATE_DIR/slurmd-$node.pid" "slurmd $node"
    done
    stop_pidfile "$STATE_DIR/slurmctld.pid" slurmctld
    if [[ -f $STATE_DIR/munged.ours ]]; then
        stop_pidfile "$MUNGE_PID" munged
        rm -f "$STATE_DIR/munged.ours"
    fi
}

status() {
    local file ok=0
    for file in "$MUNGE_PID" "$STATE_DIR/slurmctld.pid" "$STATE_DIR"/slurmd-node*.pid; do
        if pid_alive "$file"; then
            log "running: $file ($(cat "$file"))"
        else
            log "not running: $file"
            ok=1
        fi
    done
    sinfo -N || ok=1
    return "$ok"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
