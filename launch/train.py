"""Train: ``torchrun --nproc-per-node N -m launch.train CONFIG [key=value ...]``.

Also starts under ``srun`` and ``mpirun`` (see :mod:`parallel.distributed`). Exit codes: 0 done,
2 bad config or checkpoint, 3 non-finite loss or gradient norm (nothing saved), 4 too many video
files failed to decode (above data.max_skip_rate; nothing saved), 75 saved after
SIGUSR1/SIGTERM (requeue and run the same command again to resume).
"""

from __future__ import annotations

import argparse

from launch.common import config_or_exit, exit_with, process_groups_closed, setup_logging
from megavideo.config import ConfigError, validate_device, validate_start, validate_world
from parallel.distributed import detect_launch

EXIT_NONFINITE = 3
EXIT_DATA = 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__)
    parser.add_argument("config", help="YAML run config, e.g. configs/stage1_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides)
    try:
        validate_world(cfg, detect_launch().world_size)
        validate_device(cfg)
        validate_start(cfg)
    except ConfigError as err:
        exit_with(err)
    from dataloaders.loader import DataError
    from megavideo.training.checkpoint import EXIT_REQUEUE
    from megavideo.training.loop import NonFiniteError, run

    codes = {ConfigError: 2, NonFiniteError: EXIT_NONFINITE, DataError: EXIT_DATA}
    # every rank stops together: on a checkpoint they all read, a non-finite step, the skip
    # budget (all-reduced counts), and an agreed requeue
    with process_groups_closed(2, EXIT_NONFINITE, EXIT_DATA, EXIT_REQUEUE):
        try:
            run(cfg)
        except tuple(codes) as err:
            exit_with(err, codes[type(err)], show=detect_launch().rank == 0)


if __name__ == "__main__":
    main()
