"""Helper processes that end with the rank that started them.

A process started by a rank outlives a rank killed with SIGKILL: it is re-parented to pid 1 and
keeps the job step's stdout and stderr open, so SLURM waits for it (60 s) before it ends the job,
and on a GPU node it can hold memory into the next job. Linux's parent-death signal ties such a
process to the rank: :func:`die_with_parent` in the start-up of a spawned helper, and
:func:`forked_children_die_with_this_process` for every process a rank forks. This module
imports nothing heavy: spawned helpers import it first.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # prctl(2)

# what asks a rank to stop: SLURM's warning signal (--signal=USR1@...) and a preemption's SIGTERM
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (Linux only), opened once: a forked child calls into it, it does not load it."""
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (``parent``: its pid, checked
    after the call, in case it ended before)."""
    libc = _libc()
    if libc is None or libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != parent:
        os._exit(1)


_forker: tuple[int, bool] = (0, False)  # (pid, whether its main thread) of the process forking
_hooked = False


def _before_fork() -> None:
    global _forker
    _forker = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    parent, from_main_thread = _forker
    if from_main_thread:  # the signal follows the forking thread: another may end any time
        die_with_parent(parent)


def forked_children_die_with_this_process() -> None:
    """Every process forked from now on by this process's main thread (and, in turn, by theirs)
    gets SIGKILL when its parent ends.

    megatron-core's asynchronous checkpoint save forks a writer per save, which forks file
    writers in turn; killed mid-save, a rank leaves them blocked on a queue for ever, holding
    the job step open. ``subprocess`` children run no fork hooks and are not affected.
    Idempotent; nothing off Linux.
    """
    global _hooked
    if _libc() is not None and not _hooked:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hooked = True
