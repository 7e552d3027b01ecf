"""Zero-shot video-text retrieval of a stage-2 model: R@1/5/10 text->video and video->text.

The clips (a manifest's, or held-out synthetic ones) are encoded whole (no token masking: the
model is built with ``model.mask_ratio=0``), through the same pipeline and tensor-parallel layout
as training, with the schedule run forward only; the last pipeline stage ranks the similarities
and every rank gets the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from dataloaders.synthetic import PATTERNS
from megavideo.apps.retrieval import recall_at_k
from megavideo.config import Config, ConfigError
from megavideo.training import data
from megavideo.training.checkpoint import Checkpointer, resolve
from megavideo.training.loop import Trainer

log = logging.getLogger(__name__)


def embed(trainer: Trainer, batches: list[list]) -> dict[str, torch.Tensor]:
    """Run the schedule forward only over the micro-batches; on the last pipeline stage the
    concatenated embeddings (empty elsewhere)."""
    collected: dict[str, list[torch.Tensor]] = {"video": [], "text": []}

    def forward_step(data_iterator, model):
        output, features = model(next(data_iterator))
        for name, value in features.items():
            collected[name].append(value.cpu())
        return output, lambda out: (out, {})

    chunks = trainer.chunks
    for chunk in chunks:
        chunk.eval()
    iterators = [iter(b) for b in batches]
    single = len(chunks) == 1
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators[0] if single else iterators,
            model=chunks[0] if single else chunks,
            num_microbatches=len(batches[0]),
            seq_length=trainer.stage.tokens.length,
            micro_batch_size=batches[0][0].drop_u.shape[0],
            forward_only=True,
        )
    return {k: torch.cat(v) for k, v in collected.items() if v}


def retrieval(trainer: Trainer, items: list[int], micro_batch: int) -> dict[str, float]:
    """R@k of held-out clips against their captions: ``items`` are synthetic patterns or, when
    the stage reads a manifest, its rows. The last micro-batch is padded with repeats of the last
    item, whose embeddings are then dropped (and, for the interleaved schedule, whole micro-batches
    of them up to a multiple of parallel.pp)."""
    stage = trainer.stage
    par = trainer.cfg.parallel
    group = micro_batch * (par.pp if par.vpp > 1 else 1)
    padded = items + items[-1:] * (-len(items) % group)
    features = embed(trainer, stage.eval_micro_batches(padded, micro_batch))
    result = None
    if features:
        n = len(items)
        similarity = features["text"][:n] @ features["video"][:n].T  # [texts, videos]
        result = recall_at_k(similarity, torch.arange(n))
    # every last-stage rank has the same result (TP and DP replicas); hand it to every rank
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    return next(r for r in results if r is not None)


def evaluate(cfg: Config, checkpoint: str, micro_batch: int = 4) -> dict[str, float]:
    """Load ``checkpoint`` (a checkpoint directory or a run's checkpoint root) into the stage-2
    model of ``cfg`` and measure retrieval: on every clip of ``data.manifest`` with its first
    caption under ``data.captions``, or on one held-out clip per synthetic caption pattern."""
    if cfg.stage != 2:
        raise ConfigError("retrieval evaluation needs a stage-2 config (stage: 2).")
    if cfg.model.mask_ratio:
        raise ConfigError("evaluation encodes whole clips: set model.mask_ratio=0.")
    path = resolve(checkpoint)
    if not (Path(path) / "metadata.json").is_file():
        raise ConfigError(f"{checkpoint} holds no MegaVideo checkpoint (no metadata.json).")
    manifest = data.check(cfg)
    trainer = Trainer(cfg)
    Checkpointer(cfg, trainer).load(Path(path), weights_only=True)
    trainer.stage.manifest = manifest
    items = list(range(len(manifest) if manifest is not None else PATTERNS))
    result = retrieval(trainer, items, micro_batch)
    log.info("retrieval over %d clips: %s", len(items),
             "  ".join(f"{k} {v:.1f}" for k, v in result.items()))
    return result


__all__ = ["embed", "evaluate", "retrieval"]
