"""Rank code of the stage-2 tests: stage 1 -> stage 2 initialisation at another layout, clips
without audio."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

import megavideo.stages.stage2 as stage2
from megavideo.config import load_config
from megavideo.training.checkpoint import Checkpointer
from megavideo.training.loop import Trainer
from megavideo.training.state import full_state

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
COMMON = ["run.tensorboard=false", "train.warmup_steps=0", "train.global_batch=4",
          "train.micro_batch=2"]


def init_from_stage1(rank: int, world: int, root: str, out: str) -> None:
    """Stage 1 at tp2+sp saves; stage 2 at pp2 (2 of 4 frames, an image table of its own)
    starts from it and trains."""
    first = Trainer(load_config(CONFIGS / "stage1_tiny.yaml", COMMON + [
        "parallel.tp=2", "parallel.pp=1", f"run.dir={root}/s1"]))
    Checkpointer(first.cfg, first).save(1)
    stage1 = full_state(first.chunks)
    second = Trainer(load_config(CONFIGS / "stage2_tiny.yaml", COMMON + [
        "parallel.tp=1", "parallel.pp=2", "parallel.sp=false", "model.student.num_frames=2",
        "model.image_pos_embed=own",
        f"run.dir={root}/s2", f"checkpoint.load={root}/s1/checkpoints"]))
    start = Checkpointer(second.cfg, second).restore()
    parts = [None] * world
    dist.all_gather_object(parts, full_state(second.chunks))
    stage2_state = {k: v for part in parts for k, v in part.items()}
    with_audio = second.train_step(0)
    stage2.pattern_tone = lambda pattern, seconds, rate=16000: None  # every clip silent
    silent = second.train_step(1)
    audio_grads = [p.main_grad.abs().max().item() for n, p in
                   second.chunks[-1].module.named_parameters() if n.startswith("audio.")]
    if rank == world - 1:
        torch.save({"start": start, "stage1": stage1, "stage2": stage2_state,
                    "with_audio": with_audio, "silent": silent,
                    "audio_grad_max": max(audio_grads)}, out)
    assert all(math.isfinite(v) for v in silent.values())
