"""Decoded frames to the model's input: crop, resize and flip on the CPU, normalise on the device.

The same steps as the DALI pipeline (dataloaders/dali.py): the crop window of the source is
resized to ``size``×``size`` with antialiased bilinear filtering and mirrored if drawn, in 8-bit
levels; the training step's device then scales them to [0, 1] and normalises them with the chosen
mean and standard deviation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.sampling import Crop

MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def crop_resize(frames: np.ndarray, crop: Crop, size: int) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> uint8 clip [3, T, size, size]: what a decoding rank hands
    on (a quarter of the float clip's bytes to pin, copy and broadcast)."""
    window = torch.from_numpy(frames[:, crop.top:crop.top + crop.height,
                                     crop.left:crop.left + crop.width])
    x = window.permute(0, 3, 1, 2)  # [T, 3, h, w], channels-last in memory
    if x.shape[-2:] != (size, size):  # on uint8: torch's fast path, 5x the float one
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    if crop.flip:
        x = x.flip(-1)
    return x.transpose(0, 1).contiguous()


def normalize(video: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 clips [..., 3, T, H, W] -> float32 ``(x - mean) / std`` on the clips' device."""
    mean, std = (torch.tensor(v, device=video.device).view(3, 1, 1, 1) * 255
                 for v in MEAN_STD[name])
    return (video.float() - mean) / std


def to_clip(frames: np.ndarray, crop: Crop, size: int, name: str) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> the model's float clip [3, T, size, size]."""
    return normalize(crop_resize(frames, crop, size), name)


__all__ = ["MEAN_STD", "crop_resize", "normalize", "to_clip"]
