"""Deterministic synthetic videos and per-sample random streams.

Every random choice tied to a sample (its pixels, its mask draw, its stochastic-depth draws) comes
from a generator seeded by (run seed, step, global sample index, purpose), so any parallel layout
and any resumed run sees exactly the same numbers.
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, step: int, index: int, purpose: str) -> int:
    """A 63-bit seed from the run seed, the step, the global sample index and a purpose name."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, step: int, index: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, step, index, purpose))


def synthetic_video(seed: int, step: int, index: int, frames: int, size: int) -> torch.Tensor:
    """A random clip [3, frames, size, size]: upsampled coarse noise plus a little fine noise."""
    g = generator(seed, step, index, "video")
    coarse = torch.randn(3, frames, max(size // 8, 1), max(size // 8, 1), generator=g)
    video = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                            align_corners=False)
    return video + 0.1 * torch.randn(video.shape, generator=g)


def global_indices(step: int, global_batch: int, dp_rank: int, dp: int, micro: int,
                   micro_batch: int) -> list[int]:
    """Global sample indices of one micro-batch of one data-parallel rank."""
    start = step * global_batch + dp_rank * (global_batch // dp) + micro * micro_batch
    return list(range(start, start + micro_batch))
