"""Deterministic synthetic videos and per-sample random streams.

Every random choice tied to a sample (its pixels, its mask draw, its stochastic-depth draws) comes
from a stream keyed by (run seed, step, global sample index, purpose), so any parallel layout
and any resumed run sees exactly the same numbers: a host generator for what the data pipeline
draws, a key (:func:`sample_keys`) for what is drawn on the device: the synthetic clips (from the
caller's keyed normal numbers, ``kernels.keyed_random.normal``) and the step's draws.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


def sample_seed(seed: int, step: int, index: int, purpose: str) -> int:
    """A 63-bit seed from the run seed, the step, the global sample index and a purpose name."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, step: int, index: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, step, index, purpose))


def sample_keys(seed: int, step: int, indices: list[int], purpose: str,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[B] int64 keys of the samples' device-side random streams (:mod:`kernels.keyed_random`)."""
    return torch.tensor([sample_seed(seed, step, i, purpose) for i in indices], dtype=torch.long,
                        device=device)


Normal = Callable[[int], torch.Tensor]  # count -> [B, count] standard normal, one stream a sample


def synthetic_video(normal: Normal, frames: int, size: int) -> torch.Tensor:
    """Random clips [B, 3, frames, size, size] on ``normal``'s device: upsampled coarse noise plus
    a little fine noise."""
    c = max(size // 8, 1)
    coarse_n, fine_n = 3 * frames * c * c, 3 * frames * size * size
    noise = normal(coarse_n + fine_n)
    b = noise.shape[0]
    coarse = noise[:, :coarse_n].reshape(b * 3, frames, c, c)
    video = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                            align_corners=False)
    return video.view(b, 3, frames, size, size) + 0.1 * noise[:, coarse_n:].view(b, 3, frames,
                                                                                  size, size)


def global_indices(step: int, global_batch: int, dp_rank: int, dp: int, micro: int,
                   micro_batch: int) -> list[int]:
    """Global sample indices of one micro-batch of one data-parallel rank."""
    start = step * global_batch + dp_rank * (global_batch // dp) + micro * micro_batch
    return list(range(start, start + micro_batch))


# Stage 2's synthetic captioned clips: the first half of the frames is one colour, the second
# half another, and the caption names them ("red then blue"). Items sharing a pattern are the
# same item (positives of each other); a clip's sound is a tone per pattern, absent on every
# fourth item so that clips without audio are exercised.
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "yellow": (1.0, 1.0, -1.0), "purple": (1.0, -1.0, 1.0), "cyan": (-1.0, 1.0, 1.0)}
PATTERNS = len(COLOURS) ** 2
CAPTION_WORDS = (*COLOURS, "then")


def pattern_of(seed: int, index: int) -> int:
    """The colour pattern (item id) of global sample ``index``."""
    return sample_seed(seed, 0, index, "pattern") % PATTERNS


def pattern_caption(pattern: int) -> str:
    names = list(COLOURS)
    return f"{names[pattern // len(names)]} then {names[pattern % len(names)]}"


def pattern_video(normal: Normal, patterns: list[int], frames: int, size: int) -> torch.Tensor:
    """[B, 3, frames, size, size] on ``normal``'s device: each pattern's two colours plus noise of
    its sample and step."""
    names = list(COLOURS)
    rows = []
    for pattern in patterns:
        first, second = (COLOURS[names[c]] for c in divmod(pattern, len(names)))
        rows.append([first if t < frames // 2 else second for t in range(frames)])
    noise = normal(3 * frames * size * size).view(len(patterns), 3, frames, size, size)
    colours = torch.tensor(rows, device=noise.device).permute(0, 2, 1)  # [B, 3, frames]
    return colours[:, :, :, None, None] + 0.5 * noise


def pattern_tone(pattern: int, seconds: float, rate: int = 16000) -> torch.Tensor | None:
    """The pattern's sound: a sine at a frequency per pattern; None for every fourth pattern."""
    if pattern % 4 == 3:
        return None
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * torch.pi * (200.0 + 50.0 * pattern) * t)).float()
