"""Train: ``torchrun --nproc-per-node N -m launch.train CONFIG [key=value ...]``.

Also starts under ``srun`` and ``mpirun`` (see :mod:`parallel.distributed`). Exit codes: 0 done,
2 bad config or checkpoint, 3 non-finite loss or gradient norm (nothing saved), 4 too many video
files failed to decode (above data.max_skip_rate; nothing saved), 5 another rank failed first
(its error says why; this rank exits quietly), 75 saved after SIGUSR1/SIGTERM (requeue and run
the same command again to resume). With ``MEGAVIDEO_STATUS_FILE`` set (the sbatch scripts set
it) rank 0 writes its exit code there, and a save after a signal exits 0 instead, the file
saying ``requeue``: the batch script requeues the job, and SLURM's accounting shows the step
completed rather than failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from launch.common import (
    EXIT_PEER,
    config_or_exit,
    exit_together,
    exit_with,
    peer_failed,
    process_groups_closed,
    setup_logging,
)
from megavideo.config import ConfigError, validate_device, validate_start, validate_world
from parallel.distributed import detect_launch
from parallel.lifetime import STOP_SIGNALS

EXIT_NONFINITE = 3
EXIT_DATA = 4


STATUS_FILE = "MEGAVIDEO_STATUS_FILE"


def _report(rank: int, status: str) -> bool:
    """Rank 0 writes how the run ended (its exit code, or ``requeue``) to the file
    ``$MEGAVIDEO_STATUS_FILE`` names (the sbatch scripts set it: the job's code is rank 0's, not
    that of a peer the launcher stopped); False where it is not set or cannot be written."""
    path = os.environ.get(STATUS_FILE)
    if not path:
        return False
    if rank == 0:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(status)
        except OSError as err:
            print(f"error: cannot write {STATUS_FILE} {path} ({err.strerror}).", file=sys.stderr)
            return False
    return True


class _Requeued(Exception):
    """A save after a signal, reported as ``requeue`` in the status file."""


def main(argv: list[str] | None = None) -> None:
    launch = detect_launch()
    try:
        _train(argv, launch)
    except _Requeued:
        raise SystemExit(0) from None
    except SystemExit as stop:
        _report(launch.rank, str(stop.code if isinstance(stop.code, int)
                                 else int(stop.code is not None)))
        raise
    except BaseException:
        _report(launch.rank, "1")
        raise
    else:
        _report(launch.rank, "0")
    finally:
        _exit_decided()


def _exit_decided() -> None:
    """Ignore the stop signals from here on: the launcher's SIGTERM to the peers of a rank that
    ended first would otherwise turn this rank's decided exit into 143 (CPython restores the
    default action of the signals it handles as it shuts down), and srun reports the job with
    the highest signal of its tasks."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _train(argv: list[str] | None, launch) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__)
    parser.add_argument("config", help="YAML run config, e.g. configs/stage1_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides, launch.rank)
    try:
        validate_world(cfg, launch.world_size)
        validate_device(cfg)
        validate_start(cfg)
    except ConfigError as err:
        exit_together(err, 2, launch.rank)
    from dataloaders.loader import DataError
    from megavideo.training.checkpoint import EXIT_REQUEUE
    from megavideo.training.loop import NonFiniteError, run

    codes = {ConfigError: 2, NonFiniteError: EXIT_NONFINITE, DataError: EXIT_DATA}
    try:
        # every rank stops together: on a checkpoint they all read, a non-finite step, the skip
        # budget (all-reduced counts), and an agreed requeue
        with process_groups_closed(2, EXIT_NONFINITE, EXIT_DATA, EXIT_REQUEUE):
            try:
                run(cfg)
            except tuple(codes) as err:
                exit_with(err, codes[type(err)], show=launch.rank == 0)
            except Exception as err:
                if not peer_failed(err):
                    raise
                # another rank ended first (its own error says why, if it could): rank 0 says
                # so in one line, the others exit quietly
                exit_with(RuntimeError(f"another rank ended first: {str(err).splitlines()[0]}"),
                          EXIT_PEER, show=launch.rank == 0)
    except SystemExit as stop:
        if stop.code == EXIT_REQUEUE and _report(launch.rank, "requeue"):
            raise _Requeued from None
        raise


if __name__ == "__main__":
    main()
