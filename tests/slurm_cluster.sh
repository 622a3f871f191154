#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, for `make test-slurm`.
#
#   tests/slurm_cluster.sh start    install (if needed) and start munged, slurmctld, slurmd; prints
#                                   `export SLURM_CONF=...` (clients must see that file)
#   tests/slurm_cluster.sh stop     stop exactly the daemons `start` started (pid files), nothing else
#   tests/slurm_cluster.sh status   sinfo / squeue against the test cluster
#
# Idempotent: `start` on a running cluster only re-prints the export line; `stop` on a stopped one is a no-op.
# Everything lives in $PELAB_SLURM_DIR (default /tmp/pelab-slurm); /etc/slurm is not touched.
# Exit status 77 means "cannot be set up here for environmental reasons" (not root, no apt-get, the
# package registry unreachable): callers turn it into a skip. Any other failure is a real error.
set -euo pipefail

DIR="${PELAB_SLURM_DIR:-/tmp/pelab-slurm}"
CONF="$DIR/slurm.conf"
PARTITION="${PELAB_SLURM_PARTITION:-debug}"
export SLURM_CONF="$CONF"

say() { echo "slurm_cluster: $*" >&2; }
skip() { say "SKIP: $*"; exit 77; }

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || skip "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get"
    say "installing slurmctld slurmd munge slurm-client (about a minute)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            slurmctld slurmd munge slurm-client; } >"$DIR/apt.log" 2>&1; then
        tail -5 "$DIR/apt.log" >&2
        skip "apt-get could not install Slurm (log: $DIR/apt.log)"
    fi
}

write_conf() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    # Leave some memory to the OS so slurmd does not mark the node invalid.
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat >"$CONF" <<EOF
# Written by tests/slurm_cluster.sh: a one-node test cluster.
ClusterName=pelabtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pid_alive "$DIR/munged.pid"; then return 0; fi
    if pgrep -x munged >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "using the munged that is already running"
        return 0
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
                                        chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/munged.pid"
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
        case "$state" in
            idle*|mix*|alloc*) return 0 ;;
            down*|drain*|unk*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    say "the node did not become idle (state: '${state:-none}'); logs:"
    tail -20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    return 1
}

start() {
    mkdir -p "$DIR"
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" && sinfo >/dev/null 2>&1; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages
    mkdir -p "$DIR/state" "$DIR/spool"
    write_conf
    start_munge
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" -i
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
    wait_idle
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid <pidfile> <name>
    local f="$1" pid
    [[ -s "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop() {
    [[ -d "$DIR" ]] || return 0
    if [[ -s "$DIR/slurmctld.pid" ]] && sinfo >/dev/null 2>&1; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true  # no job may outlive the cluster
        sleep 1
    fi
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"
    rm -rf "$DIR/state" "$DIR/spool"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
