"""The run's video data: the checks made before any process group, the backend, the feed.

Only the first pipeline stage needs pixels, and of its tensor-parallel peers only the first
decodes; it broadcasts the clips to the others (see stages/common.py). In stage 2 the first stage
also hands the rows it decoded (replacements of bad files included) and their audio filterbanks
to the last stage, which reads their captions.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Mapping

import torch

from dataloaders import conversation, dali
from dataloaders.audio import AudioSpec
from dataloaders.loader import Clips, DataError, Feed
from dataloaders.manifest import QA_KEYS, Manifest
from dataloaders.mixture import NO_IMAGES, Mixture, proportional
from dataloaders.sampling import Sampling
from dataloaders.transform import normalize
from megavideo.config import Config, ConfigError, DataConfig

log = logging.getLogger(__name__)

MAX_WORKERS = 16  # decode processes per decoding rank when data.workers is null


def _dali_blocked(manifest: Manifest | None) -> str:
    """Which of the manifest's clips DALI's decoder would not give exactly, in words ('' none)."""
    if manifest is None or not manifest.dali_blocked:
        return ""
    row, why = next(iter(manifest.dali_blocked.items()))
    return (f"{len(manifest.dali_blocked)} of {len(manifest)} clips of {manifest.file} need PyAV "
            f"(e.g. {manifest.path(row)}: {why})")


def backend(data: DataConfig, cuda: bool, manifest: Manifest | None = None) -> str:
    """'dali' or 'pyav': auto takes DALI's NVDEC decoder on GPU ranks when DALI is installed and
    decodes every clip of the manifest exactly."""
    if data.backend != "auto":
        return data.backend
    reason = dali.missing() or _dali_blocked(manifest)
    if cuda and not reason:
        return "dali"
    if cuda:
        log.info("video decode: PyAV on the CPU (DALI's NVDEC decoder not used: %s)", reason)
    return "pyav"


def _read(cfg: Config, key: str, path: str) -> Manifest:
    """The manifest ``data.<key>`` names, every row with the text the stage needs."""
    try:
        manifest = Manifest(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.{key}: {e}.") from None
    if not len(manifest):
        raise ConfigError(f"data.{key} {path} lists no clips.")
    if cfg.stage > 1:
        captioned = cfg.stage == 2 or cfg.model.substage != "instruct"
        keys = cfg.data.captions if captioned else list(QA_KEYS)
        uncaptioned = manifest.without_text(keys)
        if len(uncaptioned):
            first = int(uncaptioned[0])
            raise ConfigError(
                f"{len(uncaptioned)} of {len(manifest)} clips of data.{key} {path} "
                f"have no {'caption' if captioned else 'question-answer pair'} under "
                f"{'data.captions=' if captioned else 'the keys '}{keys} (e.g. "
                f"{manifest.path(first)}, keys {sorted(manifest.texts(first))}).")
    return manifest


def images(cfg: Config) -> Manifest | None:
    """The image manifest (``data.image_manifest``), checked as :func:`check` checks the
    clips' (call it, as :func:`check`, before any process group)."""
    return _read(cfg, "image_manifest", cfg.data.image_manifest) if cfg.uses_images \
        and cfg.data.source == "manifest" else None


def texts(cfg: Config) -> list[dict] | None:
    """Stage 3's text-only instruction rows (``data.text_manifest``), checked before any
    process group."""
    if not (cfg.uses_text and cfg.data.source == "manifest"):
        return None
    try:
        return conversation.read_text_rows(cfg.data.text_manifest)
    except ValueError as err:
        raise ConfigError(f"data.text_manifest: {err}.") from None


def mixture(cfg: Config, manifest: Manifest | None = None, images: Manifest | None = None,
            texts: list[dict] | None = None) -> Mixture:
    """The run's media mixture (call it before any process group: a share too large is a
    ConfigError): ``data.image_fraction`` / ``data.text_fraction`` of the steps, or on manifest
    data by default each in proportion to the data's sizes."""
    data = cfg.data
    if not (cfg.uses_images or cfg.uses_text):
        return NO_IMAGES
    if data.source != "manifest":
        return Mixture(data.image_fraction or 0.0, cfg.train.seed, cfg.train.steps,
                       data.text_fraction or 0.0)
    if images is None and texts is None:
        return NO_IMAGES
    sizes = {"clips": len(manifest), "images": len(images or ()), "texts": len(texts or ())}
    given = {"images": data.image_fraction, "texts": data.text_fraction}
    shares = {kind: share if share is not None else
              proportional(sizes[kind], sum(sizes.values()) - sizes[kind])
              for kind, share in given.items()}
    if sum(shares.values()) > 1:
        raise ConfigError(f"the image and text shares of the steps add up to more than 1 "
                          f"({shares['images']:.3f} + {shares['texts']:.3f}, the unset ones in "
                          f"proportion to the data): lower data.image_fraction or set "
                          f"data.text_fraction.")
    log.info("mixed data: %s", ", ".join(
        f"{sizes[kind]} {kind}" + (f" ({100 * shares[kind]:.1f}% of the steps)"
                                   if kind in shares else "")
        for kind in sizes if sizes[kind]))
    return Mixture(shares["images"], cfg.train.seed, cfg.train.steps, shares["texts"])


def check(cfg: Config) -> Manifest | None:
    """Everything about the data that can be wrong before the run starts, as a ConfigError;
    returns the manifest when the run reads one."""
    data = cfg.data
    if data.source != "manifest":
        return None
    manifest = _read(cfg, "manifest", data.manifest)
    if data.backend != "dali":
        return manifest
    reason = dali.missing()
    if reason:
        raise ConfigError(f"data.backend=dali: {reason}.")
    blocked = _dali_blocked(manifest)
    if blocked:
        raise ConfigError(f"data.backend=dali: {blocked}; rebuild the manifest with "
                          "python -m launch.manifest --dali (which rejects them) or set "
                          "data.backend=pyav.")
    if not torch.cuda.is_available():
        counts = manifest.codec_counts()
        others = sorted(c for c in counts if c not in dali.CPU_CODECS)
        if others:
            count = sum(counts[c] for c in others)
            raise ConfigError(
                f"data.backend=dali without a GPU decodes only VP8, VP9 and MJPEG, but {count} "
                f"clips of {data.manifest} are {', '.join(others)}; use data.backend=pyav.")
    return manifest


def caption(manifest: Manifest, row: int, keys: list[str], g: torch.Generator) -> str:
    """One of the row's captions, drawn uniformly with ``g``."""
    options = manifest.captions(row, keys)
    return options[int(torch.randint(len(options), (1,), generator=g))]


def frames(cfg: Config) -> int:
    """Frames decoded per clip: stage 1 decodes the MAE teacher's (the student takes every
    tubelet-th), later stages the video encoder's."""
    return cfg.model.mae_teacher.num_frames if cfg.stage == 1 else cfg.model.student.num_frames


def audio_spec(cfg: Config) -> AudioSpec | None:
    if cfg.stage != 2 or not cfg.model.audio.enabled:
        return None
    audio = cfg.model.audio
    return AudioSpec(audio.seconds, audio.mel_bins, audio.frames)


def decoded_shapes(cfg: Config, b: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of what a decoding rank broadcasts for a micro-batch of ``b`` clips."""
    size = cfg.model.student.image_size
    out = {"video": ((b, 3, frames(cfg), size, size), torch.uint8), "rows": ((b,), torch.long)}
    spec = audio_spec(cfg)
    if spec is not None:
        out |= {"fbank": ((b, spec.frames, spec.bins), torch.float32), "has_audio": ((b,), torch.long)}
    if cfg.stage == 3 and cfg.data.time_message:
        out["times"] = ((b, 1 + frames(cfg)), torch.float64)
    return out


def clips(cfg: Config, manifest: Manifest, train: bool = True) -> Clips:
    """Manifest rows to clips as the config samples them; ``train=False``: the middle frame of
    each segment, the centre crop, no flip (evaluation)."""
    data = cfg.data
    sampling = Sampling(num_frames=frames(cfg), seed=cfg.train.seed,
                        train=train and data.frame_sampling == "random", crop=data.crop,
                        scale=(data.crop_scale[0], data.crop_scale[1]), flip=data.flip)
    return Clips(manifest, sampling, cfg.model.student.image_size, data.decode_threads,
                 audio_spec(cfg))


def decode_workers(data: DataConfig, env: Mapping[str, str] | None = None) -> int:
    """``data.workers``, or (null) the CPUs this task has less one for the training process, at
    most :data:`MAX_WORKERS`: SLURM's ``--cpus-per-task`` under srun (one task per GPU), else the
    CPUs this process may run on shared by torchrun's ranks on the node."""
    if data.workers is not None:
        return data.workers
    env = os.environ if env is None else env
    if env.get("SLURM_CPUS_PER_TASK") and "LOCAL_WORLD_SIZE" not in env:
        cpus = int(env["SLURM_CPUS_PER_TASK"])
    else:
        cpus = len(os.sched_getaffinity(0)) // max(int(env.get("LOCAL_WORLD_SIZE", 1)), 1)
    return max(min(cpus - 1, MAX_WORKERS), 0)


def feed(cfg: Config, manifest: Manifest, dp_rank: int, dp: int, device: torch.device,
         mixture: Mixture = NO_IMAGES, images: bool = False) -> Feed:
    """This data-parallel rank's feed of clips (pinned for the copy to a GPU): of the video steps
    of ``mixture``, or with ``images`` of its image steps (``cfg`` then the image steps'
    config, :meth:`Config.image_steps`; PyAV decodes them: DALI's video decoder reads no still
    images)."""
    data = cfg.data
    cuda = device.type == "cuda"
    return Feed(clips(cfg, manifest), cfg.train.global_batch, cfg.train.micro_batch, dp_rank, dp,
                "pyav" if images else backend(data, cuda, manifest), decode_workers(data),
                data.prefetch, dali_device_id=device.index if cuda else None, pin_memory=cuda,
                mixture=mixture, images=images)


def normalized(cfg: Config, video: torch.Tensor) -> torch.Tensor:
    """uint8 clips -> the model's float input (``data.normalize``), on the clips' device."""
    return normalize(video, cfg.data.normalize)


class SkipBudget:
    """Counts failed decodes and stops the run when more than ``max_rate`` of the last
    ``window`` attempts failed; until that many were made, more than ``max_rate`` x ``window``
    failures (so one bad file among the first decodes does not stop a run)."""

    def __init__(self, max_rate: float, window: int) -> None:
        self.max_rate, self.window = max_rate, window
        self.skipped = self.attempts = 0
        self.recent: collections.deque[tuple[int, int]] = collections.deque()  # per step

    def restore(self, state: dict) -> None:
        """Continue the counts of a checkpoint's ``data`` entry."""
        self.skipped, self.attempts = state.get("skipped", 0), state.get("attempts", 0)
        self.recent = collections.deque(tuple(pair) for pair in state.get("recent", []))

    def add(self, step: int, skipped: int, attempts: int,
            names: Callable[[], list[str]] = list) -> float:
        """Count a step's decodes; returns the run's skip rate so far. ``names()``: the files
        that failed (asked only when the run stops; it may be collective)."""
        self.skipped += skipped
        self.attempts += attempts
        self.recent.append((int(skipped), int(attempts)))
        while len(self.recent) > 1 and sum(a for _, a in self.recent) - self.recent[0][1] \
                >= self.window:
            self.recent.popleft()
        failed = sum(s for s, _ in self.recent)
        tried = sum(a for _, a in self.recent)
        if failed > self.max_rate * max(tried, self.window):
            files = names()
            shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5
                                            else "")
            raise DataError(
                f"step {step}: {failed} of the last {tried} clip decodes failed, above "
                f"data.max_skip_rate={self.max_rate:g} of data.skip_window={self.window} "
                f"attempts ({self.skipped} of {self.attempts} in the run){': ' if files else ''}"
                f"{shown}; fix them or probe the manifest again (python -m launch.manifest), "
                "or raise data.max_skip_rate.")
        return self.skipped / max(self.attempts, 1)

    def state(self) -> dict:
        return {"skipped": self.skipped, "attempts": self.attempts,
                "recent": [list(pair) for pair in self.recent]}


__all__ = ["MAX_WORKERS", "SkipBudget", "audio_spec", "backend", "caption", "check", "clips",
           "decode_workers", "decoded_shapes", "feed", "frames", "normalized"]
