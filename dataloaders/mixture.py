"""Which steps train on images and which on video clips, as the official stage-2 mixture does.

The official code's MetaLoader shuffles the batches of its image and video loaders into one
order, and every rank at a step sees the same medium. Here each step is an image step with
probability ``fraction``, drawn from (seed, step) alone, so every rank, layout and resume agrees;
each medium's data is read in order over its own steps (:meth:`Mixture.ordinal`), so neither
manifest is skipped through.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field


def _uniform(seed: int, step: int) -> float:
    digest = hashlib.sha256(f"{seed}:{step}:medium".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclass(frozen=True)
class Mixture:
    """The image and video steps of a run of ``steps`` steps, ``fraction`` of them images."""

    fraction: float
    seed: int
    steps: int
    _images: tuple[int, ...] = field(default=(), repr=False, compare=False)  # in order

    def __post_init__(self) -> None:
        object.__setattr__(self, "_images",
                           tuple(s for s in range(self.steps) if self.is_image(s)))

    def is_image(self, step: int) -> bool:
        return self.fraction > 0 and _uniform(self.seed, step) < self.fraction

    def ordinal(self, step: int) -> int:
        """How many steps before ``step`` train on its medium."""
        before = bisect.bisect_left(self._images, step)
        return before if self.is_image(step) else step - before


NO_IMAGES = Mixture(0.0, 0, 0)


def proportional(images: int, clips: int) -> float:
    """The official mixture's share of image batches: in proportion to the data."""
    return images / (images + clips) if images + clips else 0.0


__all__ = ["NO_IMAGES", "Mixture", "proportional"]
