"""Tubelet embedding, CLS token and position embeddings of the video ViT."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from megavideo.config import ModelConfig, Stage1ModelConfig, Stage2ModelConfig, ViTConfig
from megavideo.models.init import INIT_STD, init_with


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: sin over the first half, cos over the second (MAE's 1-D table)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, grid: int, frames: int, cls_token: bool) -> torch.Tensor:
    """InternVideo2's ``get_3d_sincos_pos_embed``: [(1 +) frames * grid * grid, dim].

    A quarter of the channels encode time, three quarters space (half height, half width); tokens
    are ordered (t, h, w); the CLS row is zeros.
    """
    dim_t, dim_s = dim // 4, dim // 4 * 3
    hh, ww = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # the official meshgrid(grid_w, grid_h) puts the w coordinate first
    spatial = torch.cat([_sincos_1d(dim_s // 2, ww), _sincos_1d(dim_s // 2, hh)], dim=1)
    temporal = _sincos_1d(dim_t, torch.arange(frames))  # [frames, dim_t]
    table = torch.cat(
        [temporal[:, None].expand(-1, grid * grid, -1), spatial[None].expand(frames, -1, -1)], dim=2
    ).reshape(frames * grid * grid, dim_t + dim_s)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim_t + dim_s, dtype=table.dtype), table])
    return table.float()


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed table: even channels sin, odd channels cos, [positions, dim]."""
    exponent = 2 * (torch.arange(dim) // 2) / dim
    angles = torch.arange(positions, dtype=torch.float64)[:, None] / 10000 ** exponent[None]
    table = torch.empty_like(angles)
    table[:, 0::2], table[:, 1::2] = angles[:, 0::2].sin(), angles[:, 1::2].cos()
    return table.float()


def interpolate_frames(pos: torch.Tensor, frames: int, new_frames: int, cls_token: bool) -> torch.Tensor:
    """Resample a (CLS +) (t, h, w) position table to another frame count, linearly in time."""
    cls, grid = (pos[:1], pos[1:]) if cls_token else (pos[:0], pos)
    per_frame = grid.shape[0] // frames
    grid = grid.reshape(frames, per_frame, -1).permute(1, 2, 0)  # [hw, dim, t]
    grid = F.interpolate(grid.float(), size=new_frames, mode="linear", align_corners=False)
    grid = grid.permute(2, 0, 1).reshape(new_frames * per_frame, -1).to(pos.dtype)
    return torch.cat([cls, grid])


def frame_mean(pos: torch.Tensor, frames: int, cls_token: bool) -> torch.Tensor:
    """A (CLS +) (t, h, w) position table averaged over its frames: an image's (CLS +) (h, w)
    table (InternVideo2-6B's for images)."""
    cls = int(cls_token)
    return torch.cat([pos[:cls], pos[cls:].unflatten(0, (frames, -1)).mean(0)])


class PatchEmbed(nn.Module):
    """Non-overlapping tubelets (tubelet x patch x patch) projected to the model width."""

    def __init__(self, vit: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        kernel = (vit.tubelet_size, vit.patch_size, vit.patch_size)
        self.proj = nn.Conv3d(3, vit.hidden_size, kernel_size=kernel, stride=kernel, dtype=dtype)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # [B, 3, T, H, W] -> [B, T'HW, C]
        return self.proj(video.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class VideoEmbedding(nn.Module):
    """Patch embedding, CLS token and the position embedding added to every token.

    A learnable table (InternVideo2's ``pos_embed``, initialised from 3-D sin-cos) or a fixed 1-D
    sinusoid table (VideoMAE's). With ``per_frame`` the frames are embedded as separate images
    (the CLIP teacher), each with its own CLS token: [B * T, 1 + HW, C].
    """

    def __init__(self, vit: ViTConfig, dtype: torch.dtype, image_pos: str = "") -> None:
        super().__init__()
        self.vit = vit
        self.image_pos = image_pos
        self.patch_embed = PatchEmbed(vit, dtype)
        frames = 1 if vit.per_frame else vit.num_frames // vit.tubelet_size
        grid = vit.image_size // vit.patch_size
        if vit.cls_token:
            self.cls_token = nn.Parameter(torch.empty(1, 1, vit.hidden_size, dtype=dtype))
            init_with(self.cls_token, partial(nn.init.trunc_normal_, std=INIT_STD))
        else:
            self.cls_token = None
        if vit.learnable_pos_embed:
            table = sincos_3d(vit.hidden_size, grid, frames, vit.cls_token)
            self.pos_embed = nn.Parameter(table.to(dtype))
        else:
            table = sinusoid_table(frames * grid * grid, vit.hidden_size)
            if vit.cls_token:
                table = torch.cat([torch.zeros(1, vit.hidden_size), table])
            self.register_buffer("pos_embed", table.to(dtype), persistent=False)
        if image_pos == "own":  # initialised as the official img_pos_embed: one frame's sin-cos
            table = sincos_3d(vit.hidden_size, grid, 1, vit.cls_token)
            self.img_pos_embed = nn.Parameter(table.to(dtype))

    def image_pos_embed(self) -> torch.Tensor:
        """An image's table [(1 +) HW, C]: its own (``image_pos`` own) or the video table's mean
        over the frames (``mean``)."""
        if self.image_pos == "own":
            return self.img_pos_embed
        return frame_mean(self.pos_embed, self.vit.num_frames // self.vit.tubelet_size,
                          self.vit.cls_token)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> [B, (1 +) T'HW, C]; one frame of a multi-frame model is an image
        (with ``image_pos``)."""
        image = bool(self.image_pos) and video.shape[2] == 1
        if self.vit.per_frame:  # [B, 3, T, H, W] -> [B*T, 3, 1, H, W]
            b, c, t, h, w = video.shape
            video = video.transpose(1, 2).reshape(b * t, c, 1, h, w)
        x = self.patch_embed(video)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + (self.image_pos_embed() if image else self.pos_embed)
        if self.image_pos == "own" and self.training:
            # the table this step leaves out, at weight 0: megatron-core's bucketed gradient
            # reduce waits for a gradient of every parameter
            x = x + 0.0 * (self.pos_embed if image else self.img_pos_embed).sum()
        return x


def num_visible(patches: int, mask_ratio: float) -> int:
    """Visible patches per frame after masking (the official ``N - int(N * ratio)``)."""
    return patches - int(patches * mask_ratio)


FP8_MULTIPLE = 16  # FP8 GEMMs take row counts that are multiples of 16 (the weight gradient's)


def seq_length(tokens: int, multiple: int) -> int:
    return math.ceil(tokens / multiple) * multiple


def padding_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What the video encoder's sequence is padded to a multiple of: tp under sequence
    parallelism (each rank holds an equal share), 16 under FP8, both when both."""
    return math.lcm(tp if sequence_parallel else 1, FP8_MULTIPLE if fp8 else 1)


@dataclass(frozen=True)
class Tokens:
    """The video encoder's token sequence: CLS + visible patches, padded for sequence parallelism
    and FP8 (:func:`padding_multiple`)."""

    real: int
    length: int

    @classmethod
    def of(cls, model: Stage1ModelConfig | Stage2ModelConfig, tp: int, sequence_parallel: bool,
           fp8: bool = False) -> Tokens:
        """Stages 1 and 2: the CLS token and each frame's visible patches."""
        student = model.student
        real = 1 + student.num_frames * num_visible(student.patches_per_frame, model.mask_ratio)
        return cls(real, seq_length(real, padding_multiple(tp, sequence_parallel, fp8)))

    @classmethod
    def whole(cls, model: ModelConfig, tp: int, sequence_parallel: bool,
              fp8: bool = False) -> Tokens:
        """Stage 3: the CLS token and every patch (no masking)."""
        real = 1 + model.student.num_patches
        return cls(real, seq_length(real, padding_multiple(tp, sequence_parallel, fp8)))

    def attention_mask(self, batch: int, device, always: bool = False) -> torch.Tensor | None:
        """[b, 1, 1, s], True on padding keys; None when there is no padding (unless ``always``:
        layers built for a padding mask, as when another step's sequence is padded)."""
        if self.length == self.real and not always:
            return None
        mask = torch.zeros(batch, 1, 1, self.length, dtype=torch.bool, device=device)
        mask[..., self.real:] = True
        return mask
