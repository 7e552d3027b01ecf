"""Clips from a manifest for one data-parallel rank: sampling, decoding, skipping bad files.

A micro-batch is a list of run positions (see sampling.py). Each position names a manifest row
and a draw (frames, crop, flip). A file that fails to decode is skipped and replaced by another
row chosen deterministically from (seed, epoch, row, attempt), so every layout and every resumed
run sees the same replacements. PyAV decodes in DataLoader worker processes; DALI decodes in a
prefetching thread (its own threads do the work), and a failing DALI batch is rebuilt from the
good samples plus replacements.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dataloaders.audio import AudioSpec, clip_fbank
from dataloaders.dali import DaliDecoder, summary
from dataloaders.manifest import Manifest
from dataloaders.mixture import IMAGE, NO_IMAGES, VIDEO, Mixture
from dataloaders.pyav_decode import DecodeError, read_frames
from dataloaders.sampling import Draw, Sampling, position_row
from dataloaders.synthetic import global_indices
from dataloaders.transform import crop_resize

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad files); the message says what to do."""


@dataclass
class Batch:
    """One micro-batch of clips and what it cost: files skipped (path, reason) and decodes tried;
    the manifest rows the clips came from; with audio, their filterbanks."""

    video: torch.Tensor  # [B, 3, T, size, size] uint8 (normalised on the training device)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    attempts: int = 0
    rows: list[int] = field(default_factory=list)
    fbank: torch.Tensor | None = None  # [B, frames, bins], zeros where has_audio is False
    has_audio: torch.Tensor | None = None  # [B] bool
    times: torch.Tensor | None = None  # [B, 1 + T] float64: each clip's fps, its frame indices

    def pin_memory(self) -> Batch:
        """The batch with its host tensors in page-locked memory (DataLoader's pinning thread
        calls this), so that the copy to the GPU runs asynchronously."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.pin_memory() if t is not None and t.device.type == "cpu" else t

        return dataclasses.replace(self, video=pin(self.video), fbank=pin(self.fbank),
                                   has_audio=pin(self.has_audio), times=pin(self.times))


class Clips:
    """Manifest rows to clips: the draws, the decode with either backend, the replacements."""

    def __init__(self, manifest: Manifest, sampling: Sampling, size: int,
                 decode_threads: int = 1, audio: AudioSpec | None = None) -> None:
        self.manifest = manifest
        self.sampling = sampling
        self.size = size
        self.decode_threads = decode_threads
        self.audio = audio

    def _with_audio(self, batch: Batch, draws: list[Draw]) -> Batch:
        """Add the chosen rows' filterbanks from the first sampled frame on (decoded here, in
        the decode worker); a clip without usable audio keeps zeros and is marked."""
        if self.audio is None:
            return batch
        banks, present = [], []
        for row, draw in zip(batch.rows, draws, strict=True):
            fps = float(self.manifest.fps[row])
            start = draw.frames[0] / fps if fps else 0.0
            bank, reason = (clip_fbank(self.manifest.path(row), start, self.audio)
                            if self.manifest.has_audio[row] else (None, "no audio"))
            banks.append(bank if reason is None else torch.zeros(self.audio.frames,
                                                                 self.audio.bins))
            present.append(reason is None)
        batch.fbank, batch.has_audio = torch.stack(banks), torch.tensor(present)
        return batch

    def _timed(self, batch: Batch, draws: list[Draw]) -> Batch:
        """The batch with when its frames were sampled (``times``)."""
        fps = self.manifest.fps
        batch.times = torch.tensor([[float(fps[row]), *draw.frames]
                                    for row, draw in zip(batch.rows, draws, strict=True)],
                                   dtype=torch.float64)
        return batch

    def _draw(self, epoch: int, row: int) -> Draw:
        m = self.manifest
        return self.sampling.draw(epoch, row, int(m.num_frames[row]), int(m.heights[row]),
                                  int(m.widths[row]))

    def _candidates(self, position: int) -> Iterator[tuple[int, int]]:
        """(epoch, row) for a position: its own row, then its replacements."""
        epoch, row = position_row(self.sampling.seed, position, len(self.manifest))
        yield epoch, row
        for attempt in range(MAX_ATTEMPTS - 1):
            yield epoch, self.sampling.replacement(epoch, row, attempt, len(self.manifest))

    def _exhausted(self, position: int) -> DataError:
        return DataError(f"sample {position}: {MAX_ATTEMPTS} files in a row failed to decode; "
                         f"check the manifest {self.manifest.file} (python -m launch.manifest "
                         "probes every file again).")

    def load_pyav(self, positions: list[int]) -> Batch:
        """Decode with PyAV on this process's CPU."""
        clips, skipped, attempts, rows, draws = [], [], 0, [], []
        for position in positions:
            for epoch, row in self._candidates(position):
                attempts += 1
                draw = self._draw(epoch, row)
                path = self.manifest.path(row)
                try:
                    frames = read_frames(path, draw.frames, self.decode_threads,
                                         bool(self.manifest.seekable[row]))
                except DecodeError as e:
                    skipped.append((path, str(e)))
                    continue
                clips.append(crop_resize(frames, draw.crop, self.size))
                rows.append(row)
                draws.append(draw)
                break
            else:
                raise self._exhausted(position)
        return self._with_audio(self._timed(Batch(torch.stack(clips), skipped, attempts, rows),
                                            draws), draws)

    def load_rows(self, rows: list[int]) -> Batch:
        """Decode exactly these rows, no replacements (evaluation); DataError when one fails."""
        clips, draws = [], []
        for row in rows:
            draw = self._draw(0, row)
            path = self.manifest.path(row)
            try:
                frames = read_frames(path, draw.frames, self.decode_threads,
                                     bool(self.manifest.seekable[row]))
            except DecodeError as e:
                raise DataError(f"evaluation clip {path} does not decode ({e}); remove it from "
                                f"the manifest {self.manifest.file}.") from None
            clips.append(crop_resize(frames, draw.crop, self.size))
            draws.append(draw)
        return self._with_audio(self._timed(Batch(torch.stack(clips), rows=list(rows)), draws),
                                draws)

    def load_dali(self, positions: list[int], decoder: DaliDecoder) -> Batch:
        """Decode with a DaliDecoder; failing samples are replaced and the batch run again."""
        candidates = [self._candidates(p) for p in positions]
        current = [next(c) for c in candidates]
        skipped, attempts = [], len(current)
        while True:
            draws = [self._draw(epoch, row) for epoch, row in current]
            paths = [self.manifest.path(row) for _, row in current]
            encoded, failed = [], {}
            for i, path in enumerate(paths):
                try:
                    data = np.fromfile(path, dtype=np.uint8)
                except OSError as e:
                    data, failed[i] = np.zeros(0, np.uint8), f"unreadable ({e})"
                if data.size == 0 and i not in failed:
                    failed[i] = "empty file"
                encoded.append(data)
            video = None
            if not failed:
                video, failed = decoder.decode(encoded, draws)
            if video is not None:
                rows = [row for _, row in current]
                return self._with_audio(self._timed(Batch(video, skipped, attempts, rows), draws),
                                        draws)
            for i, reason in sorted(failed.items()):
                skipped.append((paths[i], reason))
                replacement = next(candidates[i], None)
                if replacement is None:
                    raise self._exhausted(positions[i])
                current[i] = replacement
                attempts += 1


class _Keyed(torch.utils.data.Dataset):
    """For a DataLoader: key (step, micro) -> that micro-batch's Batch, decoded with PyAV."""

    def __init__(self, clips: Clips, positions) -> None:
        self.clips, self.positions = clips, positions

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int], Batch | DataError]:
        try:
            return key, self.clips.load_pyav(self.positions(*key))
        except DataError as e:  # raised in the training process, with its own message
            return key, e


def _as_is(item):
    return item


def _threaded(produce, keys: list[tuple[int, int]], depth: int) -> Iterator:
    """Run ``produce(key)`` for each key in a background thread, ``depth`` ahead; an exception
    is handed over in place of the result and ends the thread."""
    results: queue.Queue = queue.Queue(maxsize=max(depth, 1))

    def work() -> None:
        for key in keys:
            try:
                results.put((key, produce(key)))
            except Exception as e:  # handed to the consumer, raised there
                results.put((key, e))
                return

    threading.Thread(target=work, daemon=True, name="megavideo-dali").start()
    for _ in keys:
        key, item = results.get()
        yield key, item
        if isinstance(item, Exception):
            return


@dataclass
class Feed:
    """Where this rank's micro-batches come from: which positions, which backend, how parallel."""

    clips: Clips
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp: int
    backend: str  # "pyav" or "dali"
    workers: int = 2
    prefetch: int = 2
    dali_device_id: int | None = None
    pin_memory: bool = False  # page-locked batches from the decode processes (for a GPU)
    offset: int = 0  # consumed samples minus step * global batch (non-zero if the batch changed)
    mixture: Mixture = NO_IMAGES  # the run's image, text and video steps
    images: bool = False  # this feed serves the mixture's image steps (else its video steps)

    def positions(self, step: int, micro: int) -> list[int]:
        """The samples of a step: by its place among the steps of its medium."""
        return [p + self.offset for p in global_indices(self.mixture.ordinal(step),
                                                         self.global_batch, self.dp_rank,
                                                         self.dp, micro, self.micro_batch)]

    def iterate(self, start_step: int, steps: int, consumed_samples: int) -> Iterator[Batch]:
        """Micro-batches of steps ``start_step`` .. ``steps - 1`` of this feed's medium in order;
        ``consumed_samples`` (from the checkpoint) is where the data of ``start_step`` begins."""
        self.offset = consumed_samples - start_step * self.global_batch
        micro = self.global_batch // (self.micro_batch * self.dp)
        medium = IMAGE if self.images else VIDEO
        keys = [(s, m) for s in range(start_step, steps)
                if self.mixture.medium(s) == medium for m in range(micro)]
        if self.backend == "dali":
            decoder = DaliDecoder(self.clips.size, self.micro_batch,
                                  self.workers, self.dali_device_id)
            log.info("video decode: %s, %d threads: %s", decoder.name, self.workers,
                     summary())
            stream = _threaded(lambda key: self.clips.load_dali(self.positions(*key), decoder),
                               keys, self.prefetch)
        elif self.workers > 0:
            log.info("video decode: PyAV on the CPU, %d worker processes", self.workers)
            stream = iter(torch.utils.data.DataLoader(
                _Keyed(self.clips, self.positions), sampler=keys, batch_size=None,
                num_workers=self.workers, prefetch_factor=self.prefetch,
                multiprocessing_context="spawn", persistent_workers=False,
                collate_fn=_as_is, pin_memory=self.pin_memory))
        else:
            log.info("video decode: PyAV on the CPU, in the training process")
            stream = ((key, self.clips.load_pyav(self.positions(*key))) for key in keys)
        for expected, (key, batch) in zip(keys, stream, strict=True):
            assert tuple(key) == expected, (key, expected)
            if isinstance(batch, Exception):
                raise batch
            yield batch


__all__ = ["Batch", "Clips", "DataError", "Feed"]
