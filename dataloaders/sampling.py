"""Which clip, which frames, which crop: every draw a pure function of (seed, epoch, sample).

The order of the dataset is a fresh permutation each epoch. Position ``p`` of the run (the
``p``-th sample consumed since step 0) is sample ``order(epoch)[p % n]`` of epoch ``p // n``; a
resumed run that knows how many samples it consumed continues with the next unseen clip.

Frames as InternVideo2: the clip is split into N equal segments and one frame is taken in each,
at a random place (training) or in the middle (evaluation). Index ``k`` is
``floor((k + u_k) * length / N)`` with ``u_k`` uniform in [0, 1) or 0.5, which also stretches a
clip shorter than N frames by repeating frames evenly. (The official ``get_frame_indices`` never
picks a segment's last frame and pads short clips with their last frame.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from dataloaders.synthetic import generator


def frame_indices(length: int, n: int, u: torch.Tensor | None = None) -> list[int]:
    """N frame indices of a clip of ``length`` frames: one per segment, at fraction ``u`` of it
    (``u`` [N] in [0, 1); None: the middle)."""
    if length < 1:
        raise ValueError(f"a clip needs at least one frame, not {length}")
    offsets = [0.5] * n if u is None else u.tolist()
    return [min(int((k + offsets[k]) * length / n), length - 1) for k in range(n)]


@dataclass(frozen=True)
class Crop:
    """A window of the source frame (pixels) resized to the output size, then maybe flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def center_crop(height: int, width: int) -> Crop:
    """The centred square: what 'resize the short side, then crop the centre' takes."""
    side = min(height, width)
    return Crop((height - side) // 2, (width - side) // 2, side, side)


def random_resized_crop(height: int, width: int, scale: tuple[float, float], g: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Crop:
    """torchvision's RandomResizedCrop window (area fraction in ``scale``, aspect in ``ratio``,
    ten tries, then the centre square), drawn from ``g``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        r = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * r[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(r[2] * (height - h + 1))
            left = int(torch.rand(1, generator=g, dtype=torch.float64).item() * (width - w + 1))
            return Crop(top, left, h, w)
    return center_crop(height, width)


@dataclass(frozen=True)
class Draw:
    """Everything random about one sample of one epoch."""

    frames: list[int]
    crop: Crop


@dataclass(frozen=True)
class Sampling:
    """How samples are drawn: N frames per clip, random or middle frames, crop and flip."""

    num_frames: int
    seed: int
    train: bool = True
    crop: str = "random_resized"  # or "center"
    scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True

    def draw(self, epoch: int, row: int, length: int, height: int, width: int) -> Draw:
        """The frames and the crop of manifest row ``row`` in ``epoch``."""
        g = generator(self.seed, epoch, row, "sample")
        u = torch.rand(self.num_frames, generator=g, dtype=torch.float64) if self.train else None
        frames = frame_indices(length, self.num_frames, u)
        if self.train and self.crop == "random_resized":
            crop = random_resized_crop(height, width, self.scale, g)
        else:
            crop = center_crop(height, width)
        flip = self.train and self.flip and bool(torch.rand(1, generator=g).item() < 0.5)
        return Draw(frames, Crop(crop.top, crop.left, crop.height, crop.width, flip))

    def replacement(self, epoch: int, row: int, attempt: int, size: int) -> int:
        """The row that stands in for ``row`` after ``attempt`` failures (never ``row`` itself
        when there is another)."""
        g = generator(self.seed, epoch, row, f"replace/{attempt}")
        other = int(torch.randint(size - 1, (1,), generator=g).item()) if size > 1 else 0
        return other + (other >= row) if size > 1 else row


@lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The shuffled order of a dataset of ``size`` samples in ``epoch``."""
    return torch.randperm(size, generator=generator(seed, epoch, 0, "order"))


def position_row(seed: int, position: int, size: int) -> tuple[int, int]:
    """(epoch, manifest row) of run position ``position``."""
    epoch, offset = divmod(position, size)
    return epoch, int(epoch_order(seed, epoch, size)[offset])


__all__ = ["Crop", "Draw", "Sampling", "center_crop", "epoch_order", "frame_indices",
           "position_row", "random_resized_crop"]
