#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for MegaVideo's SLURM and MPI tests: slurmctld and
# two slurmd (nodes n1 and n2, both 127.0.0.1, each in its own UTS namespace so that `hostname`
# inside a job is the node's name) with munge, started without systemd. Installs Debian's slurmctld,
# slurmd, slurm-client, munge, libpmix2 and libpmix-dev (srun --mpi=pmix) and openmpi-bin first
# when missing.
# Needs root. Idempotent: a running cluster is left as it is. slurm/local/stop.sh stops only what
# this script started (the pid files under the state directory).
#
#   slurm/local/start.sh [--install-only]
#   export SLURM_CONF=/tmp/megavideo-slurm/slurm.conf   # then sbatch, squeue, scontrol ...
#
# Environment: MEGAVIDEO_SLURM_DIR (state directory, default /tmp/megavideo-slurm),
# MEGAVIDEO_SLURM_CPUS (CPUs each fake node offers, default 4: two 2x2 jobs can run at once).
set -euo pipefail

DIR=${MEGAVIDEO_SLURM_DIR:-/tmp/megavideo-slurm}
CPUS=${MEGAVIDEO_SLURM_CPUS:-4}
CONF=$DIR/slurm.conf
# libpmix-dev: slurm's mpi/pmix plugin loads the unversioned libpmix.so it holds
PACKAGES=(slurmctld slurmd slurm-client munge libpmix2 libpmix-dev openmpi-bin)
HOSTS_TAG="# megavideo-local-slurm"

fail() { echo "error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "the local SLURM cluster needs root (its daemons run as root without systemd)."

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them with."
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "${1:-}" = --install-only ] && exit 0

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

export SLURM_CONF=$CONF
if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd-n1.pid" && alive "$DIR/run/slurmd-n2.pid"; then
    echo "already running: export SLURM_CONF=$CONF"
    exit 0
fi
[ -d "$DIR/run" ] && "$(dirname "$0")/stop.sh" >/dev/null  # a half-started cluster from before

mkdir -p "$DIR"/{run,log,state,spool,tmp/n1,tmp/n2}
install -d -o munge -g munge "$DIR/run/munge"

# munge: reuse a running munged (e.g. the system's), else start one and remember it
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged --pid-file="$DIR/run/munge/munged.pid"
    munge -n | unmunge >/dev/null || fail "munged started but a credential does not verify."
fi

# the node names must resolve; /etc/hosts may be a bind mount, so edit it in place
if ! grep -q "$HOSTS_TAG" /etc/hosts; then
    echo "127.0.0.1 n1 n2 $HOSTS_TAG" >> /etc/hosts
fi

host=$(hostname -s)
cat > "$CONF" <<EOF
# written by slurm/local/start.sh
ClusterName=megavideo
SlurmctldHost=$host
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# short credential lifetime and scheduler intervals: a requeued job restarts in ~25 s, not ~2 min
AuthInfo=cred_expire=20
SchedulerParameters=sched_interval=5,bf_interval=5
# a loaded 2-core machine answers slowly: scontrol's 10 s default timed out ("Socket timed out")
MessageTimeout=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MailProg=/bin/true
# finished jobs stay visible to scontrol for an hour (the tests read their states and times)
MinJobAge=3600
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 State=UNKNOWN
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -c -f "$CONF"
for node in n1 n2; do
    unshare --uts sh -c "hostname $node && exec slurmd -N $node -f '$CONF'"
done

for _ in $(seq 120); do
    idle=$(sinfo -h -N -o "%N %T" 2>/dev/null | grep -c " idle$" || true)
    [ "$idle" = 2 ] && { echo "running: export SLURM_CONF=$CONF"; exit 0; }
    sleep 0.5
done
fail "the nodes did not come up within 60 s (logs in $DIR/log)."
