"""Which steps train on images, which on text alone and which on video clips, as the official
mixtures do.

The official code's MetaLoader shuffles the batches of its loaders (image, video and, in
stage 3, any instruction set) into one order, and every rank at a step sees the same medium.
Here each step is an image step with probability ``fraction`` and a text-only step (stage 3)
with probability ``text``, drawn from (seed, step) alone, so every rank, layout and resume
agrees; each medium's data is read in order over its own steps (:meth:`Mixture.ordinal`), so
no manifest is skipped through.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

VIDEO, IMAGE, TEXT = "video", "image", "text"


def _uniform(seed: int, step: int) -> float:
    digest = hashlib.sha256(f"{seed}:{step}:medium".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclass(frozen=True)
class Mixture:
    """The media of a run of ``steps`` steps: ``fraction`` of them images, ``text`` of them
    text alone, the rest video."""

    fraction: float
    seed: int
    steps: int
    text: float = 0.0
    _steps: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fraction + self.text > 1:
            raise ValueError(f"the image ({self.fraction}) and text ({self.text}) shares of the "
                             "steps add up to more than 1.")
        media = [self.medium(s) for s in range(self.steps)]
        for medium in (IMAGE, TEXT):
            self._steps[medium] = tuple(s for s, m in enumerate(media) if m == medium)

    def medium(self, step: int) -> str:
        """``"image"``, ``"text"`` or ``"video"``."""
        if not (self.fraction or self.text):
            return VIDEO
        u = _uniform(self.seed, step)
        return IMAGE if u < self.fraction else TEXT if u < self.fraction + self.text else VIDEO

    def is_image(self, step: int) -> bool:
        return self.medium(step) == IMAGE

    def ordinal(self, step: int) -> int:
        """How many steps before ``step`` train on its medium."""
        medium = self.medium(step)
        if medium != VIDEO:
            return bisect.bisect_left(self._steps[medium], step)
        return step - sum(bisect.bisect_left(steps, step) for steps in self._steps.values())


NO_IMAGES = Mixture(0.0, 0, 0)


def proportional(images: int, clips: int) -> float:
    """The official mixture's share of one data set's batches (``images``) among its and the
    others' (``clips``): in proportion to the data."""
    return images / (images + clips) if images + clips else 0.0


__all__ = ["IMAGE", "NO_IMAGES", "TEXT", "VIDEO", "Mixture", "proportional"]
