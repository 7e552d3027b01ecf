"""Checkpoint helpers: a training process killed with SIGKILL in the middle of a save (run as a
script), and the differences between two checkpoints' tensors."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megavideo.config import load_config
from megavideo.training.loop import run


def crash_mid_save(config: str, overrides: list[str], dying_save: str) -> None:
    """Train; when the save into ``dying_save`` has written its files (not yet committed), die."""
    original = dist_checkpointing.save

    def save_then_die(state, directory, *args, **kwargs):
        result = original(state, directory, *args, **kwargs)
        if Path(directory).name == dying_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dist_checkpointing.save = save_then_die
    run(load_config(config, overrides))


def differences(dir_a: str | Path, dir_b: str | Path) -> dict[str, list[float]]:
    """{key: [max |a - b|, max |a|]} of two checkpoints' tensors (in a one-rank world of its own:
    call it where no process group exists)."""
    from parallel.distributed import single_rank_world

    with single_rank_world():
        a, b = (dist_checkpointing.load_plain_tensors(d) for d in (dir_a, dir_b))
    a, b = ({k: v for k, v in d.items() if isinstance(v, torch.Tensor)} for d in (a, b))
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return {k: [float((a[k].float() - b[k].float()).abs().max()), float(a[k].float().abs().max())]
            for k in a}


if __name__ == "__main__":
    crash_mid_save(sys.argv[1], sys.argv[3:], sys.argv[2])
