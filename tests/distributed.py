"""Spawning gloo ranks on 127.0.0.1 for multi-rank tests (one process group per world size)."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """The command prefix that starts ``nproc`` ranks on 127.0.0.1 under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]


# megatron-core's GPTModel writes its attention backend into these and refuses a process where
# they name another
ATTENTION_BACKEND_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def clear_attention_backend_variables() -> None:
    """Let the next GPTModel built in this process pick its own attention backend."""
    for name in ATTENTION_BACKEND_VARIABLES:
        os.environ.pop(name, None)


def _entry(rank: int, world: int, port: int, fn, args, errors) -> None:
    threads = max(1, (os.cpu_count() or 1) // world)  # the cores shared out among the ranks
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)  # torch is imported by now: the variable alone comes too late
    clear_attention_backend_variables()  # none of what an earlier test left in pytest's
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from parallel.distributed import shutdown

        shutdown()


def spawn(world: int, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; re-raise the first rank's error."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, errors), nprocs=world,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException as err:
        first = errors.get() if not errors.empty() else (None, str(err))
        raise AssertionError(f"rank {first[0]} failed:\n{first[1]}") from None
