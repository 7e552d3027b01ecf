#!/usr/bin/env bash
# Stop the local SLURM cluster of slurm/local/start.sh: cancel its jobs, then stop the daemons whose
# pid files start.sh left (a munged that was already running is not touched) and remove the
# /etc/hosts line it added. The logs stay in the state directory.
set -uo pipefail

DIR=${MEGAVIDEO_SLURM_DIR:-/tmp/megavideo-slurm}
export SLURM_CONF=$DIR/slurm.conf
HOSTS_TAG="# megavideo-local-slurm"

pidfiles=("$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munge/munged.pid")

if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs
        for _ in $(seq 40); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

pids=()
for file in "${pidfiles[@]}"; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" && pids+=("$pid")
    rm -f "$file"
done
for _ in $(seq 40); do
    left=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    [ ${#left[@]} = 0 ] && break
    sleep 0.25
done
for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null; done

if grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    hosts=$(grep -v "$HOSTS_TAG" /etc/hosts)
    printf '%s\n' "$hosts" > /etc/hosts  # in place: /etc/hosts may be a bind mount
fi
echo "stopped (logs in $DIR/log)"
