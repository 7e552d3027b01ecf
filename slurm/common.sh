# Sourced by every sbatch script in slurm/: the environment of a training job and its one srun.
#
# The job step runs one task per GPU: `srun python -m launch.train CONFIG [key=value ...]`. No
# torchrun: each task starts its process group from SLURM's variables (SLURM_PROCID, SLURM_NTASKS,
# SLURM_LOCALID, the first host of the node list; parallel/distributed.py).
#
# Preemption and time limits: the scripts ask for `--signal=B:USR1@<seconds>`, which reaches this
# batch shell; it forwards USR1 to the step, the ranks save a checkpoint at the next step boundary
# and exit 0 with rank 0 writing "requeue" to $MEGAVIDEO_STATUS_FILE (so sacct shows the step
# COMPLETED, not FAILED), and the job requeues itself (`scontrol requeue`). The requeued job runs the same
# command, which resumes from <checkpoint dir>/latest. SIGTERM from a preemption reaches the tasks
# directly and ends the same way.
#
# Settings, from the environment of `sbatch` (exported to the job by default):
#   MEGAVIDEO_HOME       the MegaVideo checkout (default: the one holding the submitted script)
#   MEGAVIDEO_CONTAINER  a container image for pyxis/enroot (e.g. a squashfs built from the NGC
#                        PyTorch container, see docs/cluster.md); unset: no container
#   MEGAVIDEO_CONTAINER_MOUNTS  extra mounts for it, "src:dst[,src:dst]" (data, checkpoints)
#   MEGAVIDEO_PYTHON     the Python to run (default: $MEGAVIDEO_HOME/.venv/bin/python if it exists,
#                        else python3; in a container: python)
#   MEGAVIDEO_SITE       a file sourced first, for site settings: modules, NCCL_SOCKET_IFNAME ...
#   MEGAVIDEO_SRUN_ARGS  extra srun options, e.g. "--mpi=pmix" or "--cpu-bind=none"
#   MEGAVIDEO_MAX_RESTARTS  stop requeueing after this many restarts (default 100)

MEGAVIDEO_HOME=${MEGAVIDEO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$MEGAVIDEO_HOME" || exit 2
# shellcheck disable=SC1090
[ -n "${MEGAVIDEO_SITE:-}" ] && source "$MEGAVIDEO_SITE"

# --- NCCL and network: every communication setting lives here ---------------------------------
# megatron-core orders its tensor/sequence-parallel communication on one CUDA work queue
export CUDA_DEVICE_MAX_CONNECTIONS=1
# a failed or timed-out collective aborts the process instead of hanging the job
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# InfiniBand: a longer retry timeout survives congested fabrics at 32+ nodes
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# Site-specific, set in MEGAVIDEO_SITE when the defaults pick the wrong devices:
#   NCCL_SOCKET_IFNAME (bootstrap interface, e.g. ib0 or eth0), NCCL_IB_HCA (e.g. mlx5),
#   GLOO_SOCKET_IFNAME (CPU runs), NCCL_NET_GDR_LEVEL
# CPU threads per rank for PyTorch's own ops (decode runs in separate worker processes)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

megavideo_launcher() {
    # the command prefix that runs Python in every task of the step; --kill-on-bad-exit: when a
    # task fails (or is killed), the others are stopped at once instead of hanging in a
    # collective; --wait: when one task has ended well, the others get 120 s to end too
    launcher=(srun --kill-on-bad-exit=1 --wait=120)
    # shellcheck disable=SC2206
    [ -n "${MEGAVIDEO_SRUN_ARGS:-}" ] && launcher+=($MEGAVIDEO_SRUN_ARGS)
    if [ -n "${MEGAVIDEO_CONTAINER:-}" ]; then
        launcher+=(--container-image="$MEGAVIDEO_CONTAINER"
                   --container-mounts="$MEGAVIDEO_HOME:$MEGAVIDEO_HOME${MEGAVIDEO_CONTAINER_MOUNTS:+,$MEGAVIDEO_CONTAINER_MOUNTS}"
                   --container-workdir="$MEGAVIDEO_HOME"
                   "${MEGAVIDEO_PYTHON:-python}")
    elif [ -n "${MEGAVIDEO_PYTHON:-}" ]; then
        launcher+=("$MEGAVIDEO_PYTHON")
    elif [ -x "$MEGAVIDEO_HOME/.venv/bin/python" ]; then
        launcher+=("$MEGAVIDEO_HOME/.venv/bin/python")
    else
        launcher+=(python3)
    fi
}

# megavideo_train CONFIG [key=value ...]: one training step; requeue the job when it saved on a
# signal (exit code 75), else end the job with the step's exit code
megavideo_train() {
    local config=$1
    shift
    megavideo_launcher
    local log
    log=$(scontrol show job -o "${SLURM_JOB_ID:-}" 2>/dev/null | grep -o " StdOut=[^ ]*" | cut -d= -f2-)
    echo "[megavideo] $(date '+%F %T') job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}:" \
         "${SLURM_JOB_NUM_NODES:-1} nodes, ${SLURM_NTASKS:-1} tasks: ${launcher[*]} -m launch.train $config $*"
    echo "[megavideo] checkout $MEGAVIDEO_HOME, log ${log:-(not known)}"
    local start=0  # where this segment of the (appended) log begins
    [ -r "$log" ] && start=$(stat -c %s "$log")
    # where rank 0 says how it ended: its exit code, or "requeue" after a save on a signal (it
    # then exits 0); in the checkout, which every node sees
    export MEGAVIDEO_STATUS_FILE="$MEGAVIDEO_HOME/runs/.status/${SLURM_JOB_ID:-0}"
    rm -f "$MEGAVIDEO_STATUS_FILE"
    "${launcher[@]}" -m launch.train "$config" "$@" &
    local step=$!
    trap 'echo "[megavideo] $(date +%T) USR1: the step checkpoints and stops"; kill -USR1 '"$step" USR1
    # a trapped signal ends `wait` early: wait until the step has really exited
    while kill -0 "$step" 2>/dev/null; do wait "$step" || true; done
    local rc=0
    wait "$step" || rc=$?
    trap - USR1
    local status
    status=$(cat "$MEGAVIDEO_STATUS_FILE" 2>/dev/null)
    rm -f "$MEGAVIDEO_STATUS_FILE"
    if [ "$status" = requeue ]; then
        rc=75  # saved after a signal: requeue
    elif [ "$rc" != 0 ] && [ -n "$status" ] && [ "$status" != 0 ]; then
        rc=$status  # rank 0's code, not that of a peer srun stopped after the first failure
    fi
    if [ "$rc" = 75 ]; then
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MEGAVIDEO_MAX_RESTARTS:-100}" ]; then
            echo "[megavideo] saved, but not requeued: restart ${SLURM_RESTART_COUNT:-0} reached MEGAVIDEO_MAX_RESTARTS (${MEGAVIDEO_MAX_RESTARTS:-100})" >&2
            exit 75
        fi
        echo "[megavideo] $(date +%T) checkpoint saved: requeueing job $SLURM_JOB_ID"
        # a requeued job is not done: stages chained with afterok keep waiting for it
        # three tries: a busy slurmctld can time out one request
        for _ in 1 2 3; do
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            sleep 10
        done
        echo "[megavideo] scontrol requeue failed three times: the job ends unfinished (code 75)" >&2
        exit 75
    fi
    # the log ends with the cause: the last one-sentence error a rank printed
    local cause=""
    [ "$rc" != 0 ] && [ -r "$log" ] && cause=$(tail -c +$((start + 1)) "$log" | grep -a "^error: " | tail -n 1)
    if [ -z "$cause" ] && [ "$rc" -gt 128 ]; then
        # srun names the first task that went ("srun: error: n1: task 0: Killed")
        local task=""
        [ -r "$log" ] && task=$(tail -c +$((start + 1)) "$log" \
            | grep -a -m1 -E "^srun: error: [^ ]+: tasks? [0-9,-]+: " \
            | sed -E 's/^srun: error: ([^ ]+): (tasks? [0-9,-]+): .*/\2 on \1/')
        cause="${task:-a task} was killed by signal $((rc - 128)) before it could say why (kill -9, the out-of-memory killer or its node)"
    fi
    echo "[megavideo] $(date +%T) training exited with code $rc${cause:+: $cause}"
    exit "$rc"
}
