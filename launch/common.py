"""Shared start-up and end of the command-line entry points: logging, config errors as one
sentence, and the process groups torn down on a clean exit."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
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
                    r"The \.grad attribute of a Tensor that is not a leaf Tensor"):
        warnings.filterwarnings("ignore", message=message)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get(
        "OMPI_COMM_WORLD_RANK", "0")))
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every parameter at INFO


def exit_with(err: Exception, code: int = 2, show: bool = True) -> None:
    """Stop with ``error: <the one-sentence message>`` on stderr (when ``show``) and ``code``."""
    if show:
        print(f"error: {err}", file=sys.stderr)
    raise SystemExit(code) from None


def config_or_exit(path: str | None, overrides: list[str]):
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        exit_with(err)


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
