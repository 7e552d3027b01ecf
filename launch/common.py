"""Shared start-up of the command-line entry points: logging and config errors as one sentence."""

from __future__ import annotations

import logging
import os
import sys
import warnings

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
