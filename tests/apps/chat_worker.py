"""Rank code of the chat tests: greedy and top-p answers with and without the KV cache."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist

from dataloaders.synthetic import pattern_video, sample_keys
from kernels.keyed_random import normal

VOCAB = Path(__file__).resolve().parents[2] / "configs" / "vocab" / "synthetic.txt"
LAYOUTS = {  # name: overrides (2 ranks each)
    "tp1": ["parallel.tp=1", "parallel.pp=1", "parallel.encoder_tp=0"],
    "tp2_etp1": ["parallel.tp=2", "parallel.pp=1", "parallel.encoder_tp=1"],
    "pp2": ["parallel.tp=1", "parallel.pp=2", "parallel.encoder_tp=0"],
    # the QFormer reading the conversation's instruction (model.qformer.text_input)
    "tp2_etp1_instruction": ["parallel.tp=2", "parallel.pp=1", "parallel.encoder_tp=1",
                             "model.qformer.text_input=true",
                             f"model.qformer.vocab_file={VOCAB}"],
}


def answers(rank: int, world: int, config: str, out: str) -> None:
    """Per layout: the tokens of greedy and of top-p answers (two turns of one conversation),
    with the cache and without; rank 0 saves them."""
    from megavideo.apps.chat import Chat, Conversation, Sampling
    from megavideo.config import load_config

    got = {}
    for name, layout in LAYOUTS.items():
        copies = 2 if name.startswith("tp2_etp1") else 1
        dp = world // (2 if name != "tp1" else 1)
        cfg = load_config(config, layout + [
            "parallel.sp=false", f"train.micro_batch={copies}", f"train.global_batch={copies * dp}",
            "run.tensorboard=false", "model.llm.max_length=48", f"run.dir={out}.{name}"])
        chat = Chat(cfg, None)
        noise = functools.partial(normal, sample_keys(0, 0, [0], "video"))
        video = pattern_video(noise, [1], cfg.model.student.num_frames,
                              cfg.model.student.image_size)[0]
        for mode, sampling in (("greedy", Sampling()), ("top_p", Sampling(0.8, 0.9, seed=3))):
            for cache in (True, False):
                talk = Conversation(chat, video, "red then blue" if "instruction" in name
                                    else "")
                turns = []
                for question in ("what happens in the video ?", "which colour comes last ?"):
                    stream: list[str] = []
                    text = talk.ask(question, 10, sampling, cache, stream.append)
                    turns.append((text, "".join(stream), chat.stats.new_tokens))
                got[name, mode, cache] = turns
    if dist.get_rank() == 0:
        torch.save(got, out)
