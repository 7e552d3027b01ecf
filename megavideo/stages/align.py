"""Stage 3's align sub-stage (``model.substage=align``): the QFormer and the video encoder, no LLM.

One pipeline stage: the video encoder (its penultimate layer's tokens, frozen by
``model.video_frozen`` as VideoChat2 trains it) and the QFormer tensor-parallel over
``parallel.tp`` with optional SP in the encoder, the data-parallel ranks sharing the contrast's
and the matching's negatives (:mod:`megavideo.models.align`). The data are captioned clips:
synthetic colour clips with their captions, or manifest rows' captions (``data.captions``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dataloaders.synthetic import (
    generator,
    global_indices,
    pattern_caption,
    pattern_of,
    pattern_video,
    sample_keys,
)
from dataloaders.tokenizer import QFormerText
from megavideo.config import Config
from megavideo.models.align import TERMS, AlignBatch, QFormerAlignment
from megavideo.models.specs import transformer_config
from megavideo.models.video import Tokens
from megavideo.stages.common import PipelineStage
from megavideo.training import data

PURPOSES = ("vtm_video", "vtm_text")


class Align(PipelineStage):
    """This rank's whole align model and its step inputs."""

    TERMS = TERMS

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        model = cfg.model
        self.text = QFormerText(model.qformer.vocab_file)
        qformer_config = transformer_config(model.qformer, cfg.parallel, cfg.train,
                                            pipelined=False, sequence_parallel=False)
        qformer_config.hidden_dropout = qformer_config.attention_dropout = model.qformer.dropout
        self.models = [QFormerAlignment(model, self.config, qformer_config, self.tokens,
                                        self.tp_group, self.dp_group, len(self.text),
                                        self.text.dec, self.text.pad).to(device)]
        if model.video_frozen:
            self.models[0].video.requires_grad_(False)

    def pipelined(self):
        """The video encoder whole on the one pipeline stage, every patch (no masking)."""
        par, model = self.cfg.parallel, self.cfg.model
        config = transformer_config(model.student, replace(par, pp=1, vpp=1), self.cfg.train,
                                    pipelined=False, sequence_parallel=par.sp)
        tokens = Tokens.whole(model, par.tp, par.sp, self.cfg.train.precision == "fp8")
        return [model.student.num_layers - 1], tokens, config

    @property
    def loss_weights(self) -> dict[str, float]:
        align = self.cfg.model.align
        return {name: getattr(align, name) for name in TERMS}

    def _captions(self, step: int, indices: list[int]) -> tuple[torch.Tensor, list[str], list[int]]:
        """The micro-batch's clips [b, 3, T, H, W], captions and item ids."""
        seed, student = self.cfg.train.seed, self.cfg.model.student
        if self.cfg.data.source == "manifest":
            decoded = self._decoded(len(indices))
            rows = decoded["rows"].tolist()
            captions = [data.caption(self.manifest, row, self.cfg.data.captions,
                                     generator(seed, step, i, "caption"))
                        for row, i in zip(rows, indices, strict=True)]
            return decoded["video"], captions, rows
        patterns = [pattern_of(seed, i) for i in indices]
        video = pattern_video(self._noise(step, indices), patterns, student.num_frames,
                              student.image_size)
        return video, [pattern_caption(p) for p in patterns], patterns

    def micro_batches(self, step: int) -> list[list[AlignBatch]]:
        train = self.cfg.train
        self.data_wait = 0.0
        out = []
        for m in range(self.num_microbatches):
            indices = global_indices(step, train.global_batch, self.dp_rank, self.dp, m,
                                     train.micro_batch)
            video, captions, items = self._captions(step, indices)
            ids, mask = self.text.captions(captions, self.cfg.model.qformer.max_text_length)
            keys = {p: sample_keys(train.seed, step, indices, p, self.device) for p in PURPOSES}
            out.append(AlignBatch(video=video, text_ids=ids.to(self.device),
                                  text_mask=mask.to(self.device),
                                  item=torch.tensor(items, device=self.device), keys=keys))
        return [out]


__all__ = ["Align"]
