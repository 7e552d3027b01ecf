"""Helper processes that end with the rank that started them.

A process started by a rank outlives a rank killed with SIGKILL: it is re-parented to pid 1 and
keeps the job step's stdout and stderr open, so SLURM waits for it (60 s) before it ends the job,
and on a GPU node it can hold memory into the next job. :func:`die_with_parent` in such a
process's start-up ties it to the rank (Linux's parent-death signal). This module imports nothing
heavy: spawned helpers import it first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (``parent``: its pid, checked
    after the call, in case it ended before)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != parent:
        os._exit(1)


__all__ = ["die_with_parent"]
