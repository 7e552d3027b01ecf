"""Rank code of the official-recipe tests: the contrast's gradient with and without the official
all-gather, over subgroups of 2 and the world of 4; a stage-2 step with the whole recipe on."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage2_tiny.yaml"


def inputs(n: int = 8, dim: int = 6, width: int = 5):
    """A global micro-batch of n samples (two share an item) and the projection they share."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, n, dim, generator=g)
    weight = torch.randn(width, dim, generator=g)
    items = torch.arange(n)
    items[1] = 0
    return features, weight, items


def contrast_gradient(features, weight, items, rows: slice, group, official: bool) -> torch.Tensor:
    """This rank's gradient of the projection after the data-parallel average."""
    from megavideo.models.objectives import contrastive_loss
    from parallel.comm import all_gather_rows, group_size

    w = weight.clone().requires_grad_()
    x, y = features[0, rows] @ w.T, features[1, rows] @ w.T.flip(0)
    idx = items[rows]
    loss = contrastive_loss(x, y, idx, all_gather_rows(idx, group), torch.tensor(0.1), group,
                            official)
    loss.backward()
    grad = w.grad.clone()
    if group_size(group) > 1:  # DDP's average
        dist.all_reduce(grad, group=group)
        grad /= group_size(group)
    return grad


def query_inputs(n: int = 8, queries: int = 3, dim: int = 6, width: int = 5):
    """The align sub-stage's contrast: n clips' query features, n captions' features, the
    projection they share and the items (two samples share one)."""
    g = torch.Generator().manual_seed(1)
    items = torch.arange(n)
    items[1] = 0
    return (torch.randn(n, queries, dim, generator=g), torch.randn(n, dim, generator=g),
            torch.randn(width, dim, generator=g), items)


def query_contrast_gradient(clips, texts, weight, items, rows: slice, group, how: str
                            ) -> torch.Tensor:
    """This rank's gradient of the projection after the data-parallel average, for VTC over
    the queries' ``how`` (mean or max) similarity."""
    import torch.nn.functional as F

    from megavideo.models.objectives import info_nce, query_similarities
    from parallel.comm import all_gather_rows, group_size

    w = weight.clone().requires_grad_()
    v = F.normalize(clips[rows] @ w.T, dim=-1)
    t = F.normalize(texts[rows] @ w.T.flip(0), dim=-1)
    v2t, t2v = query_similarities(v, t, group, how)
    info_nce(v2t / 0.1, t2v / 0.1, items[rows], all_gather_rows(items[rows], group)).backward()
    grad = w.grad.clone()
    if group_size(group) > 1:  # DDP's average
        dist.all_reduce(grad, group=group)
        grad /= group_size(group)
    return grad


def vtc_gradients(rank: int, world: int, out: str) -> None:
    from parallel.distributed import init_distributed

    init_distributed()
    features, weight, items = inputs()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    got = {}
    for size, group in ((2, pairs[rank // 2]), (4, dist.group.WORLD)):
        local = rank % size
        per = features.shape[1] // size
        rows = slice(local * per, (local + 1) * per)
        got[size] = {official: contrast_gradient(features, weight, items, rows, group, official)
                     for official in (False, True)}
        got[size] |= {how: query_contrast_gradient(*query_inputs()[:3], query_inputs()[3], rows,
                                                   group, how) for how in ("mean", "max")}
    if rank == 0:
        torch.save(got, out)


def official_step(rank: int, world: int, root: str, out: str) -> None:
    """Two steps of stage 2 at tp 2 x dp 2 with the official recipe on; the losses and the
    temperature after an in-place clamp."""
    from megavideo.config import load_config
    from megavideo.training.loop import Trainer

    cfg = load_config(CONFIG, ["run.tensorboard=false", "train.warmup_steps=0",
                               "train.global_batch=4", "train.micro_batch=2", "parallel.tp=2",
                               "parallel.pp=1", "parallel.sp=false", "model.official_recipe=true",
                               "model.objectives.temperature=0.9", f"run.dir={root}"])
    trainer = Trainer(cfg)
    losses = [trainer.train_step(step) for step in range(2)]
    model = trainer.chunks[-1].module
    if rank == 0:
        torch.save({"losses": losses, "temperature": float(model.temperature.detach()),
                    "dropout": model.text.config.hidden_dropout}, out)
