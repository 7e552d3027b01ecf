"""Process-group start-up from the launcher's environment, and megatron-core's parallel state.

Launchers, tried in this order:
- torchrun (or any launcher exporting ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
- ``mpirun`` (Open MPI's ``OMPI_COMM_WORLD_*`` or MPICH/PMI variables): rank and size from mpi4py,
  rank 0's host name and a free port broadcast over MPI;
- ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` inside a job step): the master is
  the first host of the step's node list, the port ``MASTER_PORT`` or one derived from the job id;
- otherwise a single process.

The backend is NCCL when CUDA is available (one device per local rank), gloo on the CPU, where
:mod:`parallel.cpu_compat` is entered first and left by :func:`shutdown`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.lifetime import forked_children_die_with_this_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    launcher: str  # torchrun | mpi | slurm | single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list: ``"gpu[01-03,07],login1"`` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def free_port() -> int:
    """A TCP port free on this host now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _mpi_launch(env) -> Launch:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "launched by mpirun but mpi4py is not importable: install it (pip install mpi4py)."
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr, port = comm.bcast((socket.gethostname(), free_port()) if rank == 0 else None, root=0)
    addr = env.get("MASTER_ADDR", addr)
    port = int(env.get("MASTER_PORT", port))
    return Launch("mpi", rank, size, local, addr, port)


def detect_launch(env: dict | None = None) -> Launch:
    """Where this process sits, read from the launcher's environment variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]),
                      int(env.get("LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", 29500)))
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return _mpi_launch(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return Launch("slurm", int(env["SLURM_PROCID"]),
                      int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1))),
                      int(env.get("SLURM_LOCALID", 0)),
                      env.get("MASTER_ADDR", expand_nodelist(nodes)[0]), port)
    return Launch("single", 0, 1, 0, "127.0.0.1", free_port())


# set by SLURM in a job that was given GPUs (gres/gpu): the GPU indices, and their number
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")


def gpus_expected(env: Mapping[str, str] | None = None) -> str | None:
    """Why this process should see a GPU (SLURM gave its job some, ``CUDA_VISIBLE_DEVICES``
    names some), or None."""
    env = os.environ if env is None else env
    for name in SLURM_GPU_VARIABLES:
        value = env.get(name, "").strip()
        if value and value != "(null)" and not (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"SLURM gave this job GPUs ({name}={value})"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and not visible.startswith("-1") and visible != "NoDevFiles":
        return f"CUDA_VISIBLE_DEVICES={visible} names GPUs"
    return None


def use_local_gpu(launch: Launch) -> None:
    """Make this rank's GPU (its local rank's, round robin) the current CUDA device; do it
    before anything touches CUDA, or every rank of a node opens a context on GPU 0."""
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())


_COMPAT = contextlib.ExitStack()  # the CPU redirection of a gloo group, left with the group


def init_distributed(timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> Launch:
    """Start the default process group (NCCL on GPU, gloo on CPU) for this launch; a collective
    waits ``timeout`` for its peers (a run's: ``megavideo.config.megatron.process_group_timeout``).
    The processes this rank forks from now on die with it (:mod:`parallel.lifetime`)."""
    launch = detect_launch()
    forked_children_die_with_this_process()
    if torch.cuda.is_available():
        backend = "nccl"
        use_local_gpu(launch)
    else:
        backend = "gloo"
        if not cpu_compat.active():
            _COMPAT.enter_context(cpu_compat.redirected())
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    if launch.rank == 0:
        log.info("process group: %s, %d ranks via %s, master %s:%d", backend, launch.world_size,
                 launch.launcher, launch.master_addr, launch.master_port)
    return launch


def init_model_parallel(tp: int, pp: int, vpp: int, seed: int) -> None:
    """megatron-core's TP/PP/DP groups (order tp-dp-pp) and its seeded RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Destroy megatron-core's groups and the default process group, if they exist, and leave
    the CPU redirection :func:`init_distributed` entered.

    Every rank calls it at the end of a job that ended the same way everywhere. A process that
    exits with its gloo group alive can abort while its worker threads are torn down ("terminate
    called without an active exception", exit -6, and the launcher then kills its peers); NCCL
    warns that transfers may be left pending.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _COMPAT.close()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def single_rank_world():
    """A one-process gloo world with megatron-core's groups at tp = pp = 1 (for tools that build
    models without training them, e.g. on the meta device)."""
    from megatron.core import parallel_state

    if torch.cuda.is_available():
        use_local_gpu(detect_launch())  # megatron-core's RNG tracker below touches the device
    with cpu_compat.redirected(), tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel()
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
            yield
        finally:
            shutdown()
