#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests/test_slurm.py and tests/test_preemption.py.
#
#   bash .ci/setup-slurm.sh [start]   install (Debian: slurmctld slurmd slurm-client munge) when
#                                     missing, write /etc/slurm/slurm.conf + gres.conf for THIS
#                                     host, start munge, slurmctld, slurmd, wait until the node
#                                     is idle. Idempotent: running daemons are left alone.
#   bash .ci/setup-slurm.sh stop      stop only the daemons that this script started, by the PIDs
#                                     it recorded (never by name), and forget them.
#   bash .ci/setup-slurm.sh status    print the node state and what this script started.
#
# The node has a fake GPU (Gres=gpu:1, gres.conf File=/dev/null), so jobs asking for
# `--gpus=1` or `--gres=gpu:1` are scheduled (CUDA_VISIBLE_DEVICES=0) while the code runs on
# the CPU. There is no slurmdbd: `sacct` does not work, so the Snakemake profile uses
# `squeue` for job status, which needs MinJobAge well above the first status-check delay.
#
# SIGMOID_SC_SLURM_INSTALL=0 forbids the apt-get step (the tests set it: they may start an
# installed SLURM, never install one).
#
# State: PIDs of the daemons started here live in $SIGMOID_SC_SLURM_STATE
# (default /run/sigmoid-sc-slurm/<daemon>.pid). Daemons that were already running are not
# recorded, so `stop` never ends a SLURM this script did not start.
set -euo pipefail

ACTION="${1:-start}"
STATE_DIR="${SIGMOID_SC_SLURM_STATE:-/run/sigmoid-sc-slurm}"
CONF_DIR=/etc/slurm
LOCK_FILE=/run/lock/sigmoid-sc-setup-slurm.lock
MARKER="# written by sigmoid-sc .ci/setup-slurm.sh"
# MinJobAge: finished jobs stay visible to `squeue` this long (s); the profile's first status
# check comes after 40 s (plugin default), and the plugin wants >= 3x that.
MIN_JOB_AGE=300

log() { echo "setup-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid_alive PIDFILE -> prints the PID when the file names a running process
pid_alive() {
    local f="$1" pid
    [[ -r "$f" ]] || return 1
    read -r pid <"$f" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]} == 0)) && return 0
    [[ "${SIGMOID_SC_SLURM_INSTALL:-1}" != 0 ]] || die "missing ${missing[*]} (not installing: SIGMOID_SC_SLURM_INSTALL=0)"
    [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run as root (apt-get) or install them yourself"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get on this machine"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    # Node size read from the machine; RealMemory a little under MemTotal, since slurmd
    # marks a node INVAL when it has less memory than slurm.conf claims.
    local cpus mem_mb
    cpus=$(nproc --all)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    mkdir -p "$CONF_DIR" /run/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
    local tmp
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER
# Single node, no accounting database (no slurmdbd): use squeue, not sacct, for job status.
ClusterName=localcluster
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=${MIN_JOB_AGE}
# seconds between SIGTERM and SIGKILL on scancel/preemption: time to write a checkpoint
KillWait=30
GresTypes=gpu
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=local Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
    install_if_changed "$tmp" "$CONF_DIR/slurm.conf"
    tmp=$(mktemp "$CONF_DIR/.gres.conf.XXXXXX")
    # A fake GPU: File= is required (a count-only line marks the node INVAL).
    printf '%s\nNodeName=%s Name=gpu File=/dev/null\n' "$MARKER" "$HOST" >"$tmp"
    install_if_changed "$tmp" "$CONF_DIR/gres.conf"
}

# install_if_changed TMP DEST: rename TMP onto DEST when the contents differ (atomic).
install_if_changed() {
    if [[ -f "$2" ]] && cmp -s "$1" "$2"; then
        rm -f "$1"
    else
        chmod 644 "$1"
        mv -f "$1" "$2"
        CONFIG_CHANGED=1
        log "wrote $2"
    fi
}

# start_daemon NAME PIDFILE COMMAND...: start unless running; record the PID when started here.
start_daemon() {
    local name="$1" pidfile="$2" pid
    shift 2
    if pid=$(pid_alive "$pidfile"); then
        log "$name already running (pid $pid)"
        return 0
    fi
    # 9>&-: the daemon must not inherit the lock's descriptor, or it would hold the lock for
    # its whole life and every later start/stop would wait for it.
    "$@" >/dev/null 9>&- || die "could not start $name (see /var/log/slurm/ or /var/log/munge/)"
    for _ in $(seq 50); do
        pid=$(pid_alive "$pidfile") && break
        sleep 0.2
    done
    [[ -n "${pid:-}" ]] || die "$name did not write $pidfile"
    echo "$pid" >"$STATE_DIR/$name.pid"
    log "started $name (pid $pid)"
}

start() {
    install_packages
    HOST=$(hostname -s)
    CONFIG_CHANGED=0
    if [[ -f "$CONF_DIR/slurm.conf" ]] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
        # a SLURM configured by someone else (a cluster node, an admin): use it, start nothing
        log "$CONF_DIR/slurm.conf was not written by this script: leaving SLURM as it is"
        sinfo >/dev/null 2>&1 || die "the existing SLURM does not answer (sinfo failed)"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "writing $CONF_DIR and starting the daemons needs root"
    write_config
    mkdir -p "$STATE_DIR" /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey -c -k /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # munged drops to the munge user itself through the init script.
    start_daemon munged /run/munge/munged.pid /etc/init.d/munge start
    munge -n | unmunge >/dev/null || die "munge does not round-trip a credential"
    start_daemon slurmctld /run/slurm/slurmctld.pid /usr/sbin/slurmctld
    start_daemon slurmd /run/slurm/slurmd.pid /usr/sbin/slurmd
    if ((CONFIG_CHANGED)); then scontrol reconfigure >/dev/null 2>&1 || true; fi
    local state=""
    for i in $(seq 60); do
        state=$(node_state)
        case "$state" in
            idle | mix | alloc) break ;;
            down | drain | drng | inval | fail)
                # left over from an earlier run (e.g. node rebooted): bring it back
                if ((i % 5 == 1)); then
                    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                fi
                ;;
        esac
        sleep 1
    done
    [[ "$state" =~ ^(idle|mix|alloc)$ ]] ||
        die "node $HOST is '${state:-unknown}' after 60 s; see /var/log/slurm/slurmd.log"
    log "node $HOST is $state; partition $(sinfo -h -o %P | head -n1)"
}

stop() {
    local f name pid
    shopt -s nullglob
    for name in slurmd slurmctld munged; do # reverse start order
        f="$STATE_DIR/$name.pid"
        [[ -f "$f" ]] || continue
        if pid=$(pid_alive "$f"); then
            kill -TERM "$pid"
            for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then
                log "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            log "stopped $name (pid $pid)"
        fi
        rm -f "$f"
    done
}

status() {
    HOST=$(hostname -s)
    echo "node $HOST: $(node_state)"
    local f
    for f in "$STATE_DIR"/*.pid; do
        [[ -f "$f" ]] && echo "started here: $(basename "$f" .pid) pid $(cat "$f")"
    done
    return 0
}

# One start or stop at a time on this machine (several test sessions may call this at once:
# without the lock, a stop could end daemons that a concurrent start has just found running).
lock() {
    mkdir -p "$(dirname "$LOCK_FILE")" 2>/dev/null || true
    # not root: a lock of this user's own (it cannot start or stop the daemons anyway)
    { : >>"$LOCK_FILE"; } 2>/dev/null || LOCK_FILE="${TMPDIR:-/tmp}/sigmoid-sc-setup-slurm.$EUID.lock"
    exec 9>>"$LOCK_FILE"
    flock -w 600 9 || die "another setup-slurm.sh held $LOCK_FILE for 10 minutes"
}

case "$ACTION" in
    start) lock && start ;;
    stop) lock && stop ;;
    status) status ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
