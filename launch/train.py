"""Train: ``torchrun --nproc-per-node N -m launch.train CONFIG [key=value ...]``.

Also starts under ``srun`` and ``mpirun`` (see :mod:`parallel.distributed`).
"""

from __future__ import annotations

import argparse
import sys

from launch.common import config_or_exit, setup_logging
from megavideo.config import ConfigError, validate_world
from parallel.distributed import detect_launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__)
    parser.add_argument("config", help="YAML run config, e.g. configs/stage1_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides)
    try:
        validate_world(cfg, detect_launch().world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from megavideo.training import run

    run(cfg)


if __name__ == "__main__":
    main()
