"""Zero-shot evaluation of a stage-2 model as the official InternVideo2 code reports it:
video-text (or audio-video-text) retrieval in three score sets, or action classification.

The clips (a manifest's, or held-out synthetic ones) are encoded whole (no token masking: the
model is built with ``model.mask_ratio=0``), through the same pipeline and tensor-parallel layout
as training, with the schedule run forward only. The last pipeline stage then encodes the texts
(every caption of a clip under ``data.captions``, or its captions joined into one paragraph),
scores the similarities (:mod:`megavideo.apps.retrieval`) and re-ranks each query's top ``k``
candidates through the fusion layers and the matching head, its data-parallel ranks splitting the
queries between them; every rank gets the result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from dataloaders.synthetic import PATTERNS, pattern_caption
from megavideo.apps.retrieval import ACTION_TEMPLATES, classify, rerank, score_sets
from megavideo.config import Config, ConfigError
from megavideo.training import data
from megavideo.training.checkpoint import Checkpointer, resolve
from megavideo.training.loop import Trainer
from parallel.comm import group_device, group_size

log = logging.getLogger(__name__)

MATCH_BATCH = 32  # (caption, clip) pairs per pass of the fusion layers, as the official code


@dataclass
class Options:
    """What to measure: ``k_test`` candidates re-ranked per query (0: no re-ranking);
    ``paragraph``: a clip's captions joined into one text; ``audio``: audio-video retrieval
    (the audio-video vector and memory, the audio-video matching head); ``classify``:
    zero-shot classification, a clip's first caption naming its class."""

    k_test: int = 128
    paragraph: bool = False
    audio: bool = False
    classify: bool = False
    micro_batch: int = 4


def embed(trainer: Trainer, batches: list[list]) -> dict[str, torch.Tensor]:
    """Run the schedule forward only over the micro-batches; on the last pipeline stage the
    clips' concatenated features on the host (empty elsewhere)."""
    collected: dict[str, list[torch.Tensor]] = defaultdict(list)

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
    return {k: torch.cat(v) for k, v in collected.items()}


def texts_of(trainer: Trainer, items: list[int], paragraph: bool) -> tuple[list[str], torch.Tensor]:
    """Every text of the clips ``items`` in clip order and the clip of each text: a synthetic
    pattern's caption, or every caption of a manifest row (joined by spaces with
    ``paragraph``)."""
    stage, keys = trainer.stage, trainer.cfg.data.captions
    per_clip = [[pattern_caption(p)] for p in items] if stage.manifest is None else \
        [stage.manifest.captions(row, keys) for row in items]
    if paragraph:
        per_clip = [[" ".join(captions)] for captions in per_clip]
    texts = [text for captions in per_clip for text in captions]
    owners = torch.tensor([i for i, captions in enumerate(per_clip) for _ in captions])
    return texts, owners


def encode_texts(trainer: Trainer, texts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """The last stage's text features of ``texts`` on the host: ``text`` [T, E], ``states``
    [T, L, H], ``mask`` [T, L]."""
    model = trainer.chunks[-1].module
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            ids, mask = trainer.stage.tokenize(texts[start:start + batch])
            for name, value in model.text_features(ids, mask).items():
                out[name].append(value.cpu())
            out["mask"].append(mask.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _rows(count: int) -> range:
    """This data-parallel rank's block of ``count`` query rows."""
    group = parallel_state.get_data_parallel_group()
    ranks, rank = group_size(group), dist.get_rank(group) if group_size(group) > 1 else 0
    step = -(-count // ranks)
    return range(min(count, rank * step), min(count, (rank + 1) * step))


def _summed(matrix: torch.Tensor) -> torch.Tensor:
    """The data-parallel ranks' row blocks, put together."""
    group = parallel_state.get_data_parallel_group()
    if group_size(group) == 1:
        return matrix
    on_device = matrix.to(group_device())
    dist.all_reduce(on_device, group=group)
    return on_device.cpu()


def match_scores(trainer: Trainer, sim: torch.Tensor, clips: dict, texts: dict, k: int,
                 audio: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM re-ranking in both directions: [V, T] video -> text and [T, V] text -> video."""
    model, device = trainer.chunks[-1].module, trainer.stage.device
    memory = clips["av_memory" if audio else "memory"]
    memory_mask = clips["av_mask"] if audio else torch.ones(memory.shape[:2], dtype=torch.long)

    def logits(text_rows: torch.Tensor, clip_rows: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(text_rows), MATCH_BATCH):
            t, c = text_rows[start:start + MATCH_BATCH], clip_rows[start:start + MATCH_BATCH]
            out.append(model.match_logits(texts["states"][t].to(device), texts["mask"][t].to(device),
                                          memory[c].to(device), memory_mask[c].to(device), audio))
        return torch.cat(out)

    with torch.no_grad():
        v2t = rerank(sim, k, lambda row, top: logits(top, torch.full_like(top, row)),
                     _rows(sim.shape[0]))
        t2v = rerank(sim.T, k, lambda row, top: logits(torch.full_like(top, row), top),
                     _rows(sim.shape[1]))
    return _summed(v2t), _summed(t2v)


def _measure(trainer: Trainer, items: list[int], options: Options) -> dict[str, float] | None:
    """The last pipeline stage's scores of the clips ``items`` (None on the other stages)."""
    stage = trainer.stage
    par = trainer.cfg.parallel
    group = options.micro_batch * (par.pp if par.vpp > 1 else 1)
    padded = items + items[-1:] * (-len(items) % group)
    clips = embed(trainer, stage.eval_micro_batches(padded, options.micro_batch))
    if not clips:
        return None
    n = len(items)
    clips = {name: value[:n] for name, value in clips.items()}
    vectors = clips["av" if options.audio else "video"]
    if options.classify:
        return _classify(trainer, items, vectors)
    texts, owners = texts_of(trainer, items, options.paragraph)
    encoded = encode_texts(trainer, texts)
    sim = vectors @ encoded["text"].T  # [V, T] cosine
    match = match_scores(trainer, sim, clips, encoded, options.k_test, options.audio) \
        if options.k_test else (None, None)
    return score_sets(sim, *match, owners)


def _classify(trainer: Trainer, items: list[int], vectors: torch.Tensor) -> dict[str, float]:
    """Zero-shot top-1/top-5: the classes are the clips' distinct first captions, each embedded
    through the official action prompts."""
    stage, keys = trainer.stage, trainer.cfg.data.captions
    first = [pattern_caption(p) for p in items] if stage.manifest is None else \
        [stage.manifest.captions(row, keys)[0] for row in items]
    classes = sorted(set(first))
    prompts = [template.format(c) for c in classes for template in ACTION_TEMPLATES]
    encoded = encode_texts(trainer, prompts)["text"].unflatten(0, (len(classes), -1))
    labels = torch.tensor([classes.index(c) for c in first])
    return classify(vectors, encoded, labels) | {"classes": float(len(classes))}


def evaluate(cfg: Config, checkpoint: str, options: Options | None = None) -> dict[str, float]:
    """Load ``checkpoint`` (a checkpoint directory or a run's checkpoint root) into the stage-2
    model of ``cfg`` and score it (``options``) on every clip of ``data.manifest``, or on one
    held-out clip per synthetic caption pattern."""
    options = options or Options()
    if cfg.stage != 2:
        raise ConfigError("retrieval evaluation needs a stage-2 config (stage: 2).")
    if cfg.model.mask_ratio:
        raise ConfigError("evaluation encodes whole clips: set model.mask_ratio=0.")
    if options.audio and not cfg.model.audio.enabled:
        raise ConfigError("audio-video retrieval needs model.audio.enabled.")
    path = resolve(checkpoint)
    if not (Path(path) / "metadata.json").is_file():
        raise ConfigError(f"{checkpoint} holds no MegaVideo checkpoint (no metadata.json).")
    manifest = data.check(cfg)
    trainer = Trainer(cfg)
    Checkpointer(cfg, trainer).load(Path(path), weights_only=True)
    trainer.stage.manifest = manifest
    items = list(range(len(manifest) if manifest is not None else PATTERNS))
    result = _measure(trainer, items, options)
    # every last-stage rank has the same result (TP and DP replicas); hand it to every rank
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    result = next(r for r in results if r is not None)
    log.info("%s over %d clips: %s", "classification" if options.classify else "retrieval",
             len(items), "  ".join(f"{k} {v:.1f}" for k, v in result.items()))
    return result


__all__ = ["Options", "embed", "encode_texts", "evaluate", "match_scores", "texts_of"]
