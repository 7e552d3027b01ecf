"""Shared start-up of the command-line entry points: logging and config errors as one sentence."""

from __future__ import annotations

import logging
import os
import sys

from megavideo.config import ConfigError, load_config


def setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get(
        "OMPI_COMM_WORLD_RANK", "0")))
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every parameter at INFO


def config_or_exit(path: str | None, overrides: list[str]):
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
