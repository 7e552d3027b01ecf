"""Rank code of the ITM re-ranking test: a fresh tiny stage-2 model at dp 2, re-ranking split over
the ranks against every pair scored one at a time."""

from __future__ import annotations

from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage2_tiny.yaml"


def rerank_against_brute_force(rank: int, world: int, root: str, out: str) -> None:
    from megavideo.apps.evaluate import embed, encode_texts, match_scores, texts_of
    from megavideo.config import load_config
    from megavideo.training.loop import Trainer

    cfg = load_config(CONFIG, ["run.tensorboard=false", "parallel.tp=1", "parallel.pp=1",
                               "parallel.sp=false", "model.mask_ratio=0", "train.global_batch=4",
                               "train.micro_batch=2", f"run.dir={root}"])
    trainer = Trainer(cfg)
    items = list(range(5))
    clips = embed(trainer, trainer.stage.eval_micro_batches(items + items[-1:], 2))
    clips = {k: v[:5] for k, v in clips.items()}
    texts, _ = texts_of(trainer, [0, 1, 2, 3, 4, 5, 6], paragraph=False)
    encoded = encode_texts(trainer, texts)
    got = {}
    for audio in (False, True):
        vectors = clips["av" if audio else "video"]
        sim = vectors @ encoded["text"].T  # [5, 7]
        model, device = trainer.chunks[-1].module, trainer.stage.device
        memory = clips["av_memory" if audio else "memory"]
        mask = clips["av_mask"] if audio else torch.ones(memory.shape[:2], dtype=torch.long)
        pairs = torch.empty(5, 7)
        with torch.no_grad():
            for v in range(5):
                for t in range(7):  # one pair a pass
                    pairs[v, t] = model.match_logits(
                        encoded["states"][t:t + 1].to(device), encoded["mask"][t:t + 1].to(device),
                        memory[v:v + 1].to(device), mask[v:v + 1].to(device), audio)[0]
        got[audio] = {"sim": sim, "pairs": pairs,
                      "all": match_scores(trainer, sim, clips, encoded, 7, audio),
                      "top3": match_scores(trainer, sim, clips, encoded, 3, audio)}
    if rank == 0:
        torch.save(got, out)
