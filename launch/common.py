"""Shared start-up and end of the command-line entry points: logging, config errors as one
sentence, and the process groups torn down on a clean exit."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator

from megavideo.config import ConfigError, load_config


def setup_logging() -> None:
    """Rank 0 logs at INFO, the others at WARNING; megatron-core's and torch's known-harmless
    warnings are dropped (kernels.backends logs one line saying which backends run instead)."""
    # megatron-core's TP/SP communication ordering assumes one CUDA work queue (it warns otherwise)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for message in (r"(Transformer Engine and )?Apex (are|is) not installed",
                    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                    # the distributed optimizer's zero_grad probes .grad on its fp32 shard views
                    r"The \.grad attribute of a Tensor that is not a leaf Tensor",
                    # megatron-core's checkpoint loading on torch's deprecated entry points, at
                    # every resume
                    r"`load_state_dict` is deprecated",
                    r"Please use DTensor instead and we are deprecating ShardedTensor"):
        warnings.filterwarnings("ignore", message=message)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get(
        "OMPI_COMM_WORLD_RANK", "0")))
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every parameter at INFO


# how long a rank other than 0 waits before it exits on an error every rank meets, so that rank
# 0 has said why before the launcher (srun --kill-on-bad-exit) stops the step at the first exit
PEER_WAIT_S = 5.0
EXIT_PEER = 5  # a peer rank failed first and broke this rank's collectives: its error says why


def exit_with(err: Exception, code: int = 2, show: bool = True) -> None:
    """Stop with ``error: <the one-sentence message>`` on stderr (when ``show``) and ``code``."""
    if show:
        print(f"error: {err}", file=sys.stderr)
    raise SystemExit(code) from None


def exit_together(err: Exception, code: int, rank: int) -> None:
    """Stop on an error every rank meets (a bad config): rank 0 states it, the others exit with
    the same code, quietly, a moment later."""
    if rank != 0:
        time.sleep(PEER_WAIT_S)
    exit_with(err, code, show=rank == 0)


def config_or_exit(path: str | None, overrides: list[str], rank: int | None = None):
    """The config, or the one-sentence error (only rank 0 says it when ``rank`` is given)."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        if rank is None:
            exit_with(err)
        exit_together(err, 2, rank)


def peer_failed(err: BaseException) -> bool:
    """Whether ``err`` is a collective broken by another rank's end (gloo's closed connection,
    torch.distributed's errors), not a fault of this rank's own."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "Connection closed by peer" in text or "Connection reset by peer" in text
        or "gloo" in text.lower()))


@contextlib.contextmanager
def process_groups_closed(*agreed_exits: int) -> Iterator[None]:
    """Tear the process groups down (:func:`parallel.distributed.shutdown`) when the body returns
    or exits with one of ``agreed_exits``, codes every rank reaches together (the requeue after an
    agreed stop). An error raised on some ranks only leaves them alone, as torchtitan does:
    destroying a group is collective under NCCL, and the launcher stops the other ranks."""
    from parallel.distributed import shutdown

    try:
        yield
    except SystemExit as stop:
        if stop.code in agreed_exits:
            shutdown()
        raise
    shutdown()
