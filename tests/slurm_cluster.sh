#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for tests/test_slurm.py (root, Debian).
#
#   tests/slurm_cluster.sh start   # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   tests/slurm_cluster.sh stop    # stop the daemons this script started, remove its config
#
# `start` on a running cluster changes nothing. The config goes to /etc/slurm/slurm.conf, where every
# SLURM command looks by default: the srun that Snakemake's SLURM plugin runs inside each job drops
# SLURM_* variables, SLURM_CONF included, so a config elsewhere would not be found there. The script
# refuses to overwrite a slurm.conf it did not write. State and logs go to $SLURM_TEST_DIR
# (default /tmp/slurm-test). The node has one fake GPU (a gres whose device is /dev/null), so that jobs
# asking for a GPU, as train and sample do in workflow/profiles/slurm, are scheduled as on a GPU cluster.
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/slurm-test}
CONF=/etc/slurm/slurm.conf
MARK="# Written by tests/slurm_cluster.sh"
NODE=$(hostname -s)

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return  # already running (ours or the system's)
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # munged refuses to run as root: run it as the munge user that the package created.
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    touch "$DIR/munged.ours"  # so that stop leaves alone a munged that it did not start
}

write_config() {
    if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -qx "$MARK"; then
        echo "$CONF exists and was not written by $0: not touching a real cluster's config" >&2
        exit 1
    fi
    mkdir -p /etc/slurm "$DIR/state" "$DIR/spool"
    # The node's CPUs, sockets and cores as slurmd detects them (a mismatch would drain the node),
    # and 80% of its memory, leaving room for the daemons and the test itself.
    local hardware memory_mb
    hardware=$(slurmd -C | head -1 | sed -E 's/ RealMemory=[0-9]+//')
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat >"$CONF" <<EOF
$MARK
ClusterName=test
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups (they may not work in a VM or container): track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No accounting database, so no sacct: Snakemake's plugin asks squeue, which shows finished jobs
# for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
# Schedule cores and memory separately, so that small jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Start pending jobs within a second of a slot freeing up.
SchedulerParameters=sched_interval=1
ReturnToService=2
GresTypes=gpu
$hardware RealMemory=$memory_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    # Without a File slurmd finds no GPU and the node is drained; any existing file will do.
    printf '%s\nNodeName=%s Name=gpu File=/dev/null\n' "$MARK" "$NODE" >/etc/slurm/gres.conf
}

daemon_running() {
    [ -s "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

start() {
    install_packages
    mkdir -p "$DIR"
    start_munge
    if ! daemon_running slurmctld; then
        write_config
        slurmctld -c  # -c: start clean, forgetting the jobs and node states of an earlier cluster
    fi
    daemon_running slurmd || slurmd
    for _ in $(seq 30); do
        case $(sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null) in
            idle | mixed | allocated) return ;;
            down* | drain* | inval*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    echo "the node never became idle: see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    exit 1
}

stop() {
    local pid
    for daemon in slurmd slurmctld; do
        daemon_running "$daemon" || continue
        pid=$(cat "$DIR/$daemon.pid")
        kill "$pid"
        # Wait until it has gone, so that a start right after finds its port free.
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    done
    if [ -e "$DIR/munged.ours" ]; then
        munged --stop >/dev/null 2>&1 || true
        rm "$DIR/munged.ours"
    fi
    # Remove our config: with it and no slurmctld, every SLURM command (and so every later snakemake,
    # whose SLURM plugin asks `scontrol show config` when it loads) waits ~10 s for the controller.
    for file in "$CONF" /etc/slurm/gres.conf; do
        if [ -e "$file" ] && head -1 "$file" | grep -qx "$MARK"; then rm "$file"; fi
    done
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
