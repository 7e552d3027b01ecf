"""The two frozen stage-1 teachers and the attention-guided masking they drive.

- CLIP teacher (InternViT-6B-shaped): an image ViT applied to each student frame, with an
  attention-pool head. Its targets are the L2-normalised residual streams of its last K layers
  (the per-frame CLS tokens averaged into one) and the frame-averaged pooled vector; the pool's
  attention over each frame's patches chooses the tokens the student sees.
- MAE teacher (VideoMAEv2-g-shaped): a video ViT with tubelet 2 over twice the student's frames,
  so both have one token per (student frame, patch). Targets: its last K layers, the last one
  through the final LayerNorm, L2-normalised.

Both run forward-only under no_grad on the first pipeline stage (see :mod:`megavideo.stages.stage1`
for why), tensor-parallel over the student's TP group (each TP rank computes its slice of every
teacher layer, so a micro-batch's targets are computed once per TP group) or, with
``parallel.teacher_tp`` below ``parallel.tp``, over smaller groups of their own
(:mod:`parallel.encoder_groups`): each group computes the targets of its share of the clips and
the replica group gathers them, so the teachers' TP traffic shrinks (none at teacher_tp 1) for
their weights' memory.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.keyed_random import gumbel
from megavideo.config import Stage1ModelConfig
from megavideo.models.embedding import num_visible
from megavideo.models.heads import AttentionPool, l2_normalize
from megavideo.models.specs import ViTTransformerConfig, without_sequence_parallel
from megavideo.models.vit import VisionTransformer
from parallel.comm import gather_along
from parallel.encoder_groups import EncoderGroups

BATCH_DIM = {"visible": 0, "clip": 1, "mae": 1, "final": 0}  # where each target holds the clips


class ClipTeacher(nn.Module):
    def __init__(self, model: Stage1ModelConfig, config: ViTTransformerConfig, tp_group,
                 pg_collection=None) -> None:
        super().__init__()
        vit = model.clip_teacher
        self.vit = VisionTransformer(vit, config, pg_collection)
        self.pool = AttentionPool(without_sequence_parallel(config), vit.hidden_size, vit.pool_heads,
                                  vit.pool_dim, model.aligner_norm_eps, tp_group)
        self.frames = vit.num_frames
        self.taps = list(range(vit.num_layers - model.clip_layers, vit.num_layers))

    def forward(self, frames: torch.Tensor):
        """frames [B, 3, T, H, W] -> features [K, B, 1 + T*P, C], final [B, D], attention [B*T, P]."""
        b, t = frames.shape[0], self.frames
        x, tapped = self.vit(frames, self.taps)  # x: [1 + P, B*T, C]
        pooled, attention = self.pool(x, return_attention=True)
        z = torch.stack([tapped[i] for i in self.taps]).transpose(1, 2)  # [K, B*T, 1 + P, C]
        z = z.reshape(len(self.taps), b, t, z.shape[2], z.shape[3])
        cls = z[:, :, :, :1].mean(2)  # one CLS token: the per-frame ones averaged
        patches = z[:, :, :, 1:].reshape(len(self.taps), b, -1, z.shape[-1])
        features = l2_normalize(torch.cat([cls, patches], dim=2))
        final = l2_normalize(pooled.view(b, t, -1).mean(1))
        return features, final, attention[:, 1:]


class MaeTeacher(nn.Module):
    def __init__(self, model: Stage1ModelConfig, config: ViTTransformerConfig,
                 pg_collection=None) -> None:
        super().__init__()
        vit = model.mae_teacher
        self.vit = VisionTransformer(vit, config, pg_collection)
        self.taps = list(range(vit.num_layers - model.mae_layers, vit.num_layers))

    def forward(self, video: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 2T, H, W], visible patch indices [B, n] -> features [K, B, n, C]."""
        x, tapped = self.vit(video, self.taps)  # x (after the final norm): [T*P, B, C]
        layers = [tapped[i] for i in self.taps[:-1]] + [x]
        z = torch.stack(layers).transpose(1, 2)  # [K, B, T*P, C]
        index = patches[None, :, :, None].expand(z.shape[0], -1, -1, z.shape[-1])
        return l2_normalize(torch.gather(z, 2, index))


def attention_guided_mask(
    attention: torch.Tensor, frames: int, visible: int, keys: torch.Tensor
) -> torch.Tensor:
    """Visible token indices [B, 1 + frames*visible], sorted, 0 being the CLS token.

    In each frame ``visible`` patches are drawn without replacement with probability proportional
    to the CLIP teacher's attention, on the device (Gumbel-top-k: the distribution of
    torch.multinomial without replacement); keys [B] are the samples' random streams, so the draw
    does not depend on the parallel layout.
    """
    b, patches = keys.shape[0], attention.shape[-1]
    scores = attention.double().view(b, frames, patches).log() + gumbel(keys, (frames, patches))
    picked = scores.topk(visible, dim=-1).indices  # [B, frames, visible]
    offsets = 1 + torch.arange(frames, device=attention.device)[:, None] * patches
    tokens = (offsets + picked).flatten(1).sort(dim=1).values
    return torch.cat([tokens.new_zeros(b, 1), tokens], dim=1)


class Stage1Teachers(nn.Module):
    """Both teachers; :meth:`forward` turns a clip into the mask and all targets."""

    def __init__(self, model: Stage1ModelConfig, clip_config, mae_config, tp_group,
                 groups: EncoderGroups | None = None) -> None:
        """``groups``: the teachers' own TP groups (``parallel.teacher_tp``), None for the
        student's."""
        super().__init__()
        self.model = model
        self.dtype = clip_config.params_dtype  # targets leave in the model's dtype (bf16 or fp32)
        pgs = groups.pg_collection if groups is not None else None
        self.clip = ClipTeacher(model, clip_config, groups.tp_group if groups else tp_group, pgs)
        self.mae = MaeTeacher(model, mae_config, pgs)
        self.groups = groups if groups is not None and groups.replicas > 1 else None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, video: torch.Tensor, keys: torch.Tensor) -> dict:
        """video [B, 3, 2T, H, W] (the MAE teacher's frames; the student and the CLIP teacher see
        every other one), keys [B] (the samples' mask streams) -> dict of visible indices and targets,
        batch-first. With teacher groups
        smaller than the TP group, each computes its share of the clips and the replica group
        gathers the whole micro-batch's."""
        frames = video[:, :, :: self.model.mae_teacher.tubelet_size]
        if self.groups is None:
            return {"student_frames": frames, **self._targets(video, keys)}
        g = self.groups
        share = video.shape[0] // g.replicas
        mine = slice(g.replica * share, (g.replica + 1) * share)
        part = self._targets(video[mine], keys[mine])
        return {"student_frames": frames,
                **{k: gather_along(v, BATCH_DIM[k], g.replica_group) for k, v in part.items()}}

    def _targets(self, video: torch.Tensor, keys: torch.Tensor) -> dict:
        model = self.model
        frames = video[:, :, :: model.mae_teacher.tubelet_size]
        clip_features, final, attention = self.clip(frames)
        per_frame = model.student.patches_per_frame
        visible = attention_guided_mask(attention, model.student.num_frames,
                                        num_visible(per_frame, model.mask_ratio), keys)
        index = visible[None, :, :, None].expand(clip_features.shape[0], -1, -1,
                                                 clip_features.shape[-1])
        clip_targets = torch.gather(clip_features, 2, index)  # [K, B, n, C]
        mae_targets = self.mae(video, visible[:, 1:] - 1)
        return {
            "visible": visible,
            "clip": clip_targets.to(self.dtype),
            "mae": mae_targets.to(self.dtype),
            "final": final.to(self.dtype),
        }
