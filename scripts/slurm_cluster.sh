#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the Slurm tests and for trying the submitit
# launcher before going to a real cluster.
#
#   scripts/slurm_cluster.sh start [--if-possible]   install (apt, root only) and start
#   scripts/slurm_cluster.sh stop                    stop the daemons this script started
#   scripts/slurm_cluster.sh status                  daemons and `sinfo`; exit 0 when up
#
# Debian's slurm-wlm and munge are installed with apt-get when missing (it says so first;
# SLURM_CLUSTER_INSTALL=0 never installs). Daemons need root:
# as another user `start` says what to do and exits 2; with --if-possible (what `make test`
# uses) it prints the reason, records it for the tests' skip message and exits 0, so the
# suite runs and the Slurm tests skip. A cluster that should start (root, packages present)
# but does not is always an error.
#
# Everything lives in $SLURM_STATE_DIR (default /tmp/reptile_gen_slurm): slurm.conf, pid
# files, logs, the controller's state and the node's spool. slurm.conf is also installed at
# /etc/slurm/slurm.conf (Slurm's default path, so every command and every job finds it
# without SLURM_CONF) unless a slurm.conf not written by this script is already there; then
# export SLURM_CONF=$SLURM_STATE_DIR/slurm.conf, which `start` prints.
set -euo pipefail

STATE_DIR="${SLURM_STATE_DIR:-/tmp/reptile_gen_slurm}"
CONF="$STATE_DIR/slurm.conf"
DEFAULT_CONF=/etc/slurm/slurm.conf
MARK="# written by reptile_gen scripts/slurm_cluster.sh"
UNAVAILABLE="$STATE_DIR/unavailable"   # why the cluster could not be started (read by tests)
NODE="$(hostname -s)"

log() { echo "slurm_cluster: $*" >&2; }

# The slurm.conf every Slurm command of this shell should read.
use_conf() {
    if [[ -f "$DEFAULT_CONF" ]] && grep -qF "$MARK" "$DEFAULT_CONF"; then
        export SLURM_CONF="$DEFAULT_CONF"
    else
        export SLURM_CONF="$CONF"
    fi
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ready() {
    # idle, mixed or allocated: the node accepts jobs ("idle*" or "down" do not count)
    local state
    state="$(timeout 10 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1)" || return 1
    [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

is_up() {
    use_conf
    pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" && node_ready
}

# "Cannot start": exit 2, or 0 with --if-possible (the reason is kept for the tests).
cannot() {
    mkdir -p "$STATE_DIR"
    echo "$1" >"$UNAVAILABLE"
    log "not started: $1"
    if [[ "$IF_POSSIBLE" == 1 ]]; then
        log "continuing without a Slurm cluster (the Slurm tests will skip)"
        exit 0
    fi
    exit 2
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo sbatch munged munge; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null ||
        cannot "${missing[*]} not installed and no apt-get (install Slurm and munge by hand)"
    [[ "${SLURM_CLUSTER_INSTALL:-1}" == 0 ]] &&
        cannot "${missing[*]} not installed and SLURM_CLUSTER_INSTALL=0 (no apt-get install)"
    log "installing the system packages slurm-wlm and munge with apt-get (missing:" \
        "${missing[*]}): the Slurm tests (tests/cli/test_slurm.py) submit jobs to a" \
        "one-node cluster on localhost. SLURM_CLUSTER_INSTALL=0 skips this (the Slurm" \
        "tests then skip); \`make slurm-down\` stops the cluster afterwards"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurm-wlm munge; } >"$STATE_DIR/apt.log" 2>&1; then
        tail -5 "$STATE_DIR/apt.log" >&2
        cannot "apt-get install slurm-wlm munge failed (log: $STATE_DIR/apt.log)"
    fi
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already running (ours or the system's): keep it
    fi
    munged --force --pid-file="$STATE_DIR/munged.pid" --log-file="$STATE_DIR/munged.log"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged does not answer (log: $STATE_DIR/munged.log)"
    exit 1
}

write_conf() {
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
    cat >"$CONF" <<EOF
$MARK (state in $STATE_DIR)
ClusterName=local
SlurmctldHost=$NODE
AuthType=auth/munge
# credential lifetime; also how long a requeued job waits before it may start again
# (default 120 s: a preempted test job would sit pending for two minutes)
AuthInfo=cred_expire=10
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s), e.g. a requeued job whose wait is over
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
# a requeued or cancelled job's processes get SIGKILL this many seconds after SIGTERM
KillWait=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
NodeName=$NODE CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -e "$DEFAULT_CONF" ]] || grep -qF "$MARK" "$DEFAULT_CONF"; then
        mkdir -p "$(dirname "$DEFAULT_CONF")"
        cp "$CONF" "$DEFAULT_CONF"
    else
        log "$DEFAULT_CONF belongs to another Slurm setup: left alone; use SLURM_CONF=$CONF"
    fi
}

start() {
    if is_up; then
        log "already running (SLURM_CONF=$SLURM_CONF)"
        status
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then
        cannot "needs root (Slurm daemons and munge): run 'sudo scripts/slurm_cluster.sh start'"
    fi
    mkdir -p "$STATE_DIR"
    rm -f "$UNAVAILABLE"
    install_packages
    stop_daemons quiet  # leftovers of a half-started cluster
    start_munge
    write_conf
    use_conf
    # -c: start from a clean controller state (no jobs of an earlier session)
    slurmctld -c -f "$CONF"
    for _ in $(seq 50); do
        timeout 5 scontrol ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    slurmd -f "$CONF"
    for _ in $(seq 150); do
        if node_ready; then
            log "up: node $NODE idle (SLURM_CONF=$SLURM_CONF)"
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    log "node $NODE did not become idle in 30 s; logs: $STATE_DIR/slurmctld.log, slurmd.log"
    timeout 10 sinfo -N -l >&2 || true
    exit 1
}

# Stop the daemons by their pid files (only what this script started).
stop_daemons() {
    local quiet="${1:-}"
    for name in slurmd slurmctld munged; do
        local pidfile="$STATE_DIR/$name.pid"
        [[ -f "$pidfile" ]] || continue
        local pid
        pid="$(cat "$pidfile")"
        if kill -0 "$pid" 2>/dev/null; then
            [[ -z "$quiet" ]] && log "stopping $name (pid $pid)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

stop() {
    stop_daemons
    log "stopped"
}

status() {
    use_conf
    local up=0
    for name in munged slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$name.pid"; then
            echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"
        else
            echo "$name: not running (from $STATE_DIR)"
        fi
    done
    echo "SLURM_CONF=$SLURM_CONF"
    if command -v sinfo >/dev/null && node_ready; then
        timeout 10 sinfo
        return 0
    fi
    [[ -f "$UNAVAILABLE" ]] && echo "not started: $(cat "$UNAVAILABLE")"
    return 3
}

IF_POSSIBLE=0
cmd="${1:-}"
shift || true
for arg in "$@"; do
    case "$arg" in
        --if-possible) IF_POSSIBLE=1 ;;
        *) log "unknown option $arg"; exit 64 ;;
    esac
done
case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start [--if-possible] | stop | status" >&2
        exit 64
        ;;
esac
