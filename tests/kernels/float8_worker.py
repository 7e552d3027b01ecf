"""Rank code of the FP8 training test: a few steps of the tiny stage-1 model per case, in one
process group; rank 0 writes {case: losses}."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megavideo.config import load_config
from megavideo.training.loop import Trainer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage1_tiny.yaml"
BASE = ["train.global_batch=8", "train.micro_batch=2", "train.warmup_steps=0", "train.steps=5",
        "run.tensorboard=false", "parallel.pp=1", "train.seed=7"]


def losses(rank: int, world: int, cases: dict[str, list[str]], steps: int, out: str) -> None:
    results = {}
    for name, overrides in cases.items():
        trainer = Trainer(load_config(CONFIG, BASE + overrides))
        results[name] = [trainer.train_step(step)["loss"] for step in range(steps)]
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
