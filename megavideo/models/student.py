"""The stage-1 student: InternVideo2's ViT with its aligners, one pipeline chunk at a time.

Forward of a chunk (sequence-first, [s, b, h]):

    first chunk   video -> tubelets + CLS + pos_embed -> keep the visible tokens -> pad -> SP split
    every chunk   its blocks; at a tapped layer: gather the sequence, + clip/mae_pos_embed of the
                  visible tokens, aligner, 2 - 2 cos against the teacher's target
    last chunk    attention pool -> final aligner -> 2 - 2 cos against the teacher's pooled vector

The CLIP aligners sit on the last ``clip_layers`` layers and the MAE aligners on the last
``mae_layers``; the loss is ``w_clip * mean_k clip_k + w_final * final + w_mae * mean_k mae_k``.
A chunk that is not the last attaches its share of the loss to its output (the pipeline schedule
back-propagates only from outputs). ``clip_pos_embed``/``mae_pos_embed`` are one parameter each in
the official model; when the aligned layers span chunks every such chunk holds a copy, tied like
megatron-core's shared word embeddings (see :func:`parallel.comm.all_reduce_tied_grads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megavideo.config import Stage1ModelConfig
from megavideo.models.embedding import sincos_3d
from megavideo.models.heads import ClipAligner, MaeAligner, cosine_loss
from megavideo.models.specs import ViTTransformerConfig, without_sequence_parallel
from megavideo.models.video import Tokens, VideoChunk
from parallel.comm import attach_loss
from parallel.layout import Chunk


@dataclass
class Stage1Batch:
    """What one chunk needs for one micro-batch (batch-first tensors)."""

    drop_u: torch.Tensor  # [B, layers, 2] stochastic-depth draws
    loss_scale: float  # the schedule's scale of this micro-batch's loss (1 / micro-batches)
    video: torch.Tensor | None = None  # [B, 3, T, H, W], first chunk
    visible: torch.Tensor | None = None  # [B, n] token indices, first chunk and aligner chunks
    clip: dict[int, torch.Tensor] = field(default_factory=dict)  # aligner k -> [B, n, C]
    mae: dict[int, torch.Tensor] = field(default_factory=dict)  # aligner k -> [B, n - 1, C]
    final: torch.Tensor | None = None  # [B, D], last chunk


def aligned_layers(model: Stage1ModelConfig) -> tuple[dict[int, int], dict[int, int]]:
    """Student layer -> aligner index, for the CLIP and the MAE aligners."""
    depth = model.student.num_layers
    clip = {depth - model.clip_layers + k: k for k in range(model.clip_layers)}
    mae = {depth - model.mae_layers + k: k for k in range(model.mae_layers)}
    return clip, mae


def _pos_param(table: torch.Tensor, dtype: torch.dtype, tied: str, owner: bool) -> nn.Parameter:
    param = nn.Parameter(table.to(dtype))
    param.no_weight_decay = True
    param.tied_name = tied
    param.shared_embedding = True  # own DDP bucket: identical DP sharding on every stage
    param.shared = not owner  # count one copy in the gradient norm
    return param


class Stage1Student(VideoChunk):
    """One pipeline chunk of the stage-1 student: the video encoder plus the aligners."""

    def __init__(self, model: Stage1ModelConfig, config: ViTTransformerConfig, chunk: Chunk, tokens: Tokens,
                 tp_group) -> None:
        super().__init__(model, config, chunk, tokens, tp_group)
        student = model.student
        self.model_config = model
        dtype = config.params_dtype
        heads = without_sequence_parallel(config)
        eps = model.aligner_norm_eps
        clip, mae = aligned_layers(model)
        self.clip_at = {layer: k for layer, k in clip.items() if layer in chunk.layers}
        self.mae_at = {layer: k for layer, k in mae.items() if layer in chunk.layers}
        d = student.hidden_size
        self.clip_aligners = nn.ModuleDict({
            str(k): ClipAligner(heads, d, model.clip_teacher.hidden_size, eps, tp_group)
            for k in self.clip_at.values()})
        self.mae_aligners = nn.ModuleDict({
            str(k): MaeAligner(heads, d, model.mae_teacher.hidden_size, eps, tp_group)
            for k in self.mae_at.values()})
        grid, frames = student.image_size // student.patch_size, student.num_frames
        owner = self.post_process  # the last chunk always holds the last aligned layer
        self.clip_pos_embed = _pos_param(sincos_3d(d, grid, frames, True), dtype, "clip_pos_embed",
                                         owner) if self.clip_at else None
        self.mae_pos_embed = _pos_param(sincos_3d(d, grid, frames, False), dtype, "mae_pos_embed",
                                        owner) if self.mae_at else None
        if self.post_process:
            self.final_aligner = ClipAligner(heads, student.pool_dim, model.clip_teacher.pool_dim,
                                             eps, tp_group)

    def _aligner_losses(self, tapped: dict, batch: Stage1Batch) -> dict[str, torch.Tensor]:
        model = self.model_config
        terms = {}
        visible = batch.visible.transpose(0, 1)  # [n, B]
        clip = [cosine_loss(self.clip_aligners[str(k)](self.full_sequence(tapped[layer])
                                                        + self.clip_pos_embed[visible]).transpose(0, 1),
                            batch.clip[k]) for layer, k in self.clip_at.items()]
        if clip:
            terms["clip"] = torch.stack(clip).sum() / model.clip_layers
        mae = [cosine_loss(self.mae_aligners[str(k)](self.full_sequence(tapped[layer])[1:]
                                                      + self.mae_pos_embed[visible[1:] - 1]).transpose(0, 1),
                           batch.mae[k]) for layer, k in self.mae_at.items()]
        if mae:
            terms["mae"] = torch.stack(mae).sum() / model.mae_layers
        return terms

    def forward(self, batch: Stage1Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (output, loss terms): the hidden state for the next chunk, or on the last chunk
        the micro-batch loss. The terms are this chunk's shares of the loss, for logging."""
        taps = set(self.clip_at) | set(self.mae_at)
        hidden, tapped = self.encode(batch.video, batch.visible, batch.drop_u, taps)
        terms = self._aligner_losses(tapped, batch) if taps else {}
        if self.post_process:
            pooled = self.pool(self.full_sequence(hidden))
            final = self.final_aligner(pooled[None])[0]
            terms["final"] = cosine_loss(final, batch.final)
        weights = dict(zip(("clip", "final", "mae"), self.model_config.loss_weights, strict=False))
        loss = sum(weights[name] * value for name, value in terms.items()) if terms else None
        if self.post_process:
            return loss, {k: v.detach() for k, v in terms.items()}
        if loss is not None:
            hidden = attach_loss(hidden, loss, batch.loss_scale)
        return hidden, {k: v.detach() for k, v in terms.items()}
