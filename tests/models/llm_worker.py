"""Rank code of the LLM decoder tests (megatron-core needs a process group to build models)."""

from __future__ import annotations

from pathlib import Path

import torch

from megavideo.accounting.describe import meta_device
from megavideo.config import ParallelConfig, TrainConfig, load_config
from megavideo.models.llm import build_llm, llm_config
from parallel.distributed import single_rank_world

STAGE3 = Path(__file__).resolve().parents[2] / "configs" / "stage3_tiny.yaml"


def count_and_run(rank: int, world: int, out: str) -> None:
    """Mistral-7B's parameter count on the meta device; one forward of the tiny decoder."""
    with single_rank_world():
        _count_and_run(out)


def _count_and_run(out: str) -> None:
    one = ParallelConfig()
    big = load_config(STAGE3, ["model.llm.preset=mistral-7b"]).model.llm
    with meta_device():
        model = build_llm(big, llm_config(big, one, TrainConfig()))
    counts = {name.split(".")[0]: 0 for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        counts[name.split(".")[0]] += param.numel()
    tiny = load_config(STAGE3, ["model.llm.preset=llm-tiny"]).model.llm
    torch.manual_seed(0)
    model = build_llm(tiny, llm_config(tiny, one, TrainConfig()))
    ids = torch.randint(tiny.vocab_size, (2, 12))
    positions = torch.arange(12)[None].expand(2, -1)
    logits = model(ids, positions, attention_mask=None)
    loss = model(ids, positions, attention_mask=None, labels=ids.roll(-1, dims=1))
    loss.mean().backward()
    # causal: changing the last token leaves every earlier position's logits unchanged
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % tiny.vocab_size
    again = model(changed, positions, attention_mask=None)
    torch.save({"counts": counts, "total": sum(counts.values()), "logits": tuple(logits.shape),
                "loss": tuple(loss.shape), "finite": bool(torch.isfinite(loss).all()),
                "causal": bool(torch.equal(again[:, :-1], logits[:, :-1])),
                "grads": all(p.grad is not None for p in model.parameters())}, out)
