"""Decoded frames to the model's input on the CPU: crop, resize, flip, normalise.

The same steps as the DALI pipeline (dataloaders/dali.py): the crop window of the source is
resized to ``size``×``size`` with antialiased bilinear filtering, mirrored if drawn, scaled to
[0, 1] and normalised with the chosen mean and standard deviation.
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


def to_clip(frames: np.ndarray, crop: Crop, size: int, normalize: str) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> float clip [3, T, size, size]."""
    window = torch.from_numpy(frames[:, crop.top:crop.top + crop.height,
                                     crop.left:crop.left + crop.width])
    x = window.permute(0, 3, 1, 2)  # [T, 3, h, w], channels-last in memory
    if x.shape[-2:] != (size, size):  # on uint8: torch's fast path, 5x the float one
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    x = x.float()
    if crop.flip:
        x = x.flip(-1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in MEAN_STD[normalize])
    return ((x - mean) / std).transpose(0, 1).contiguous()


__all__ = ["MEAN_STD", "to_clip"]
