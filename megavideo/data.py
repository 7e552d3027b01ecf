"""The run's video data: the checks made before any process group, the backend, the feed.

Only the first pipeline stage needs pixels, and of its tensor-parallel peers only the first
decodes; it broadcasts the clips to the others (see stages/stage1.py).
"""

from __future__ import annotations

import logging

import torch

from dataloaders import dali
from dataloaders.loader import Clips, DataError, Feed
from dataloaders.manifest import Manifest
from dataloaders.sampling import Sampling
from megavideo.config import Config, ConfigError, DataConfig

log = logging.getLogger(__name__)


def backend(data: DataConfig, cuda: bool) -> str:
    """'dali' or 'pyav': auto takes DALI's NVDEC decoder on GPU ranks when DALI is installed."""
    if data.backend != "auto":
        return data.backend
    if cuda and dali.missing() is None:
        return "dali"
    if cuda:
        log.info("video decode: DALI is not installed, PyAV decodes on the CPU instead")
    return "pyav"


def check(cfg: Config) -> Manifest | None:
    """Everything about the data that can be wrong before the run starts, as a ConfigError;
    returns the manifest when the run reads one."""
    data = cfg.data
    if data.source != "manifest":
        return None
    try:
        manifest = Manifest(data.manifest)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.manifest: {e}.") from None
    if not len(manifest):
        raise ConfigError(f"data.manifest {data.manifest} lists no clips.")
    if data.backend != "dali":
        return manifest
    reason = dali.missing()
    if reason:
        raise ConfigError(f"data.backend=dali: {reason}.")
    if not torch.cuda.is_available():
        counts = manifest.codec_counts()
        others = sorted(c for c in counts if c not in dali.CPU_CODECS)
        if others:
            count = sum(counts[c] for c in others)
            raise ConfigError(
                f"data.backend=dali without a GPU decodes only VP8, VP9 and MJPEG, but {count} "
                f"clips of {data.manifest} are {', '.join(others)}; use data.backend=pyav.")
    return manifest


def feed(cfg: Config, manifest: Manifest, dp_rank: int, dp: int, device: torch.device) -> Feed:
    """This data-parallel rank's feed of clips."""
    data, model = cfg.data, cfg.model
    sampling = Sampling(num_frames=model.mae_teacher.num_frames, seed=cfg.train.seed,
                        train=data.frame_sampling == "random", crop=data.crop,
                        scale=(data.crop_scale[0], data.crop_scale[1]), flip=data.flip)
    clips = Clips(manifest, sampling, model.student.image_size, data.normalize,
                  data.decode_threads)
    cuda = device.type == "cuda"
    return Feed(clips, cfg.train.global_batch, cfg.train.micro_batch, dp_rank, dp,
                backend(data, cuda), data.workers, data.prefetch,
                dali_device_id=device.index if cuda else None)


class SkipBudget:
    """Counts failed decodes over the run and stops it past ``data.max_skip_rate``."""

    def __init__(self, max_rate: float, min_attempts: int) -> None:
        self.max_rate, self.min_attempts = max_rate, min_attempts
        self.skipped = self.attempts = 0

    def restore(self, state: dict) -> None:
        """Continue the counts of a checkpoint's ``data`` entry."""
        self.skipped, self.attempts = state.get("skipped", 0), state.get("attempts", 0)

    def add(self, step: int, skipped: int, attempts: int) -> float:
        """Count a step's decodes; returns the run's skip rate so far."""
        self.skipped += skipped
        self.attempts += attempts
        if self.attempts >= self.min_attempts and self.skipped > self.max_rate * self.attempts:
            raise DataError(
                f"step {step}: {self.skipped} of {self.attempts} clip decodes failed "
                f"({self.skipped / self.attempts:.1%}), above data.max_skip_rate="
                f"{self.max_rate:g}; the decoding ranks logged each file ('skipped ...'): fix "
                "them or probe the manifest again (python -m launch.manifest), or raise "
                "data.max_skip_rate.")
        return self.skipped / max(self.attempts, 1)

    def state(self) -> dict:
        return {"skipped": self.skipped, "attempts": self.attempts}


__all__ = ["SkipBudget", "backend", "check", "feed"]
