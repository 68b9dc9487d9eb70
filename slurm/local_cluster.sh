#!/bin/bash
# A one-node SLURM cluster on this machine, to try the sbatch scripts (and to test them: the test
# suite's `slurm` tests run on it). Linux, as root (slurmd launches jobs; munged needs its key).
#
#   slurm/local_cluster.sh install   apt-get install slurm-wlm munge, when they are missing
#   slurm/local_cluster.sh start     install if needed, configure, start munged + slurmctld + slurmd
#   slurm/local_cluster.sh status    what runs, the node's state and the queue
#   slurm/local_cluster.sh stop      cancel the jobs, stop exactly the daemons `start` started, and
#                                    remove everything it wrote (the state directory, the config)
#
# Everything lives in one state directory, IMG_SLURM_DIR (default /tmp/img-local-slurm): munge's key
# and socket, slurmctld's state, slurmd's spool, the daemons' logs and pid files. The one file
# outside it is /etc/slurm/slurm.conf, where every client looks (sbatch, scontrol, and also the
# `scontrol requeue` a job runs on its node); `start` refuses to touch a slurm.conf it did not
# write, so a machine with a real SLURM configuration is left alone. The node has this machine's
# CPUs and memory (`slurmd -C`), no GPUs: submit with CPU resources (docs/slurm.md, "A cluster on
# your machine"). munged runs on its own key and socket, beside any system munged.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by img-lightning slurm/local_cluster.sh; state directory:"
DIR=${IMG_SLURM_DIR:-/tmp/img-local-slurm}
HOST=$(hostname -s)
PORT_CTLD=${IMG_SLURM_CTLD_PORT:-6817}
PORT_SLURMD=${IMG_SLURM_SLURMD_PORT:-6818}

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

our_dir() {  # the state directory named by our slurm.conf (empty: no slurm.conf of ours)
    [[ -f "$CONF" ]] && sed -n "s|^${MARKER} ||p" "$CONF" | head -n 1 || true
}

alive() {  # alive PIDFILE NAME: the pid in PIDFILE is a running NAME process
    local pid
    [[ -f "$1" ]] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$2" ]]
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || [[ -x /usr/sbin/munged ]] || missing+=(munge)
    for tool in slurmctld slurmd sbatch; do
        command -v "$tool" >/dev/null || [[ -x "/usr/sbin/$tool" ]] || { missing+=(slurm-wlm); break; }
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || die "SLURM is not installed (${missing[*]}) and only root can install it: sudo apt-get install -y slurm-wlm munge"
    command -v apt-get >/dev/null || die "SLURM is not installed (${missing[*]}) and there is no apt-get: install slurm-wlm and munge with your package manager"
    echo "installing ${missing[*]} (apt-get)"
    local guard=/usr/sbin/policy-rc.d ours=""
    if [[ ! -e "$guard" ]]; then  # apt would start the packages' own services (a system munged, ...)
        printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod 755 "$guard" && ours=1
    fi
    local ok=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || ok=1
    if [[ -n "$ours" ]]; then rm -f "$guard"; fi
    ((ok == 0)) || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    local node
    # this machine's CPUs, sockets, cores and memory, as slurmd will find them
    node=$(/usr/sbin/slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=${HOST} NodeAddr=127.0.0.1/")
    mkdir -p "$(dirname "$CONF")"
    cat > "$CONF.img-local.tmp" <<EOF
${MARKER} ${DIR}
ClusterName=img-local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${PORT_CTLD}
SlurmdPort=${PORT_SLURMD}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${DIR}/munge/munge.socket
# no cgroups (containers rarely allow them): processes tracked by parentage, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a full scheduling pass every 2 s (a requeued job still waits ~2 min, its BeginTime: scontrol update JobId=ID StartTime=now)
SchedulerParameters=sched_interval=2
JobRequeue=1
MinJobAge=3600
ReturnToService=2
MpiDefault=none
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.log
${node}
PartitionName=local Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.img-local.tmp" "$CONF"
}

wait_idle() {
    local state=""
    for _ in $(seq 1 120); do
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)
        [[ "$state" == idle* ]] && return 0
        sleep 0.5
    done
    echo "the node did not become idle (state: ${state:-unknown}); slurmd log:" >&2
    tail -n 20 "$DIR/log/slurmd.log" >&2 || true
    scontrol show node "$HOST" 2>/dev/null | grep -i reason >&2 || true
    return 1
}

start() {
    [[ $EUID -eq 0 ]] || die "run as root: slurmd launches the jobs and munged needs its key"
    install_packages
    local ours
    ours=$(our_dir)
    if [[ -f "$CONF" && -z "$ours" ]]; then
        die "$CONF exists and was not written by this script: this machine has a SLURM configuration, use it (or move it away)"
    fi
    if [[ -n "$ours" ]] && alive "$ours/run/slurmctld.pid" slurmctld; then
        die "a local cluster already runs (state directory $ours); stop it first: $0 stop"
    fi
    if [[ -n "$ours" ]]; then stop_quietly "$ours"; fi  # left over from a killed session
    rm -rf "$DIR"
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    chmod 700 "$DIR/munge"
    # munged: its own key and socket (a system munged, if any, is not touched)
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    /usr/sbin/munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start: $(tail -n 5 "$DIR/log/munged.log" 2>/dev/null)"
    write_config
    /usr/sbin/slurmctld || die "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
    /usr/sbin/slurmd || die "slurmd did not start: $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
    if ! wait_idle; then
        stop_quietly "$DIR"
        die "the cluster did not come up (everything started was stopped again)"
    fi
    echo "local SLURM cluster up: node ${HOST} ($(sinfo -h -o '%c CPUs, %m MB' | head -n 1)), partition local"
    echo "state and logs: $DIR; stop it with: $0 stop"
}

stop_daemon() {  # stop_daemon PIDFILE NAME
    local pid
    alive "$1" "$2" || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        [[ -d "/proc/$pid" ]] || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop_quietly() {  # stop_quietly DIR: cancel the jobs, stop our daemons, remove what start wrote
    local dir=$1 jobs
    if alive "$dir/run/slurmctld.pid" slurmctld; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 60); do  # the jobs' processes end before slurmd does
                [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemon "$dir/run/slurmd.pid" slurmd
    stop_daemon "$dir/run/slurmctld.pid" slurmctld
    stop_daemon "$dir/run/munged.pid" munged
    if [[ "$(our_dir)" == "$dir" ]]; then rm -f "$CONF"; fi
    rm -rf "$dir"
}

stop() {
    local ours
    ours=$(our_dir)
    [[ -n "$ours" ]] || { echo "no local cluster (no $CONF written by this script)"; return 0; }
    stop_quietly "$ours"
    echo "local SLURM cluster stopped; removed $ours and $CONF"
}

status() {
    local ours
    ours=$(our_dir)
    if [[ -z "$ours" ]] || ! alive "$ours/run/slurmctld.pid" slurmctld; then
        echo "no local cluster running"
        return 3
    fi
    for d in munged slurmctld slurmd; do
        if alive "$ours/run/$d.pid" "$d"; then echo "$d: running (pid $(cat "$ours/run/$d.pid"))"; else echo "$d: not running"; fi
    done
    echo "state directory: $ours"
    sinfo
    squeue
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|status|stop  (state directory: IMG_SLURM_DIR, default /tmp/img-local-slurm)" >&2; exit 2 ;;
esac
