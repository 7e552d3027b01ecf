"""Decoding chosen frames with PyAV (FFmpeg), exactly, for every container and codec FFmpeg reads.

Frame ``i`` is the ``i``-th frame a full sequential decode outputs (presentation order, as for
DALI's ``frames`` argument), shown as a player shows it: the stream's display matrix applied
(a phone's 90° or 270°) and every frame at the stream's size (a resolution change mid-stream is
rescaled). Two ways to get there:

- **by timestamp** (fast): the packets are demuxed once (no decoding) for every frame's timestamp
  and the key frames, packets an edit list discards left out; the decoder seeks to the key frame
  before a wanted frame when that skips work and decodes forward. Each seek is verified: the
  first frame out at or after the aimed key frame must be a key frame to the decoder and not
  after the wanted frame (MPEG-TS, MPEG-PS and AVI files often flag or land on others); else the
  seek is retried from an earlier key frame, and then the clip is decoded in order. Only files
  whose timestamps are unique in a monotonic decode order take this way;
- **in order**: decode from the start and count the frames that come out (concatenated
  MPEG-TS, whose timestamps restart; files the manifest found unseekable).
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

SEEK_TRIES = 3  # key frames tried (the nearest, then earlier ones) before decoding in order


class DecodeError(Exception):
    """A clip that cannot give the frames asked of it; the message says why."""


class _SeekMiss(Exception):
    """A seek or a timestamp the decoder did not honour: decode in order instead."""


@dataclass(frozen=True)
class FrameIndex:
    """What the demuxed packets say about a video stream."""

    pts: list[int]  # every frame's presentation timestamp, sorted: frame i is pts[i]
    keys: list[int]  # the key frames' timestamps, as the demuxer flags them
    ordered: bool  # unique timestamps in a monotonic decode order: frames addressable by them
    discarded: int  # packets an edit list cuts away (decoded for reference, never shown)


def frame_index(container: av.container.InputContainer, stream) -> FrameIndex:
    """The frame timestamps of ``stream`` from one demux pass (no decoding)."""
    pts, keys, discarded, ordered, last_dts = [], [], 0, True, None
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        if packet.is_discard:
            discarded += 1
            continue
        if packet.dts is not None:
            ordered &= last_dts is None or packet.dts > last_dts
            last_dts = packet.dts
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    pts.sort()
    keys.sort()
    ordered &= len(set(pts)) == len(pts)
    return FrameIndex(pts, keys, ordered, discarded)


def rotation_of(frame: av.VideoFrame) -> int:
    """The display matrix's counterclockwise rotation of a decoded frame, in degrees 0..359."""
    return int(round(frame.rotation)) % 360


def picture(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """A decoded frame as uint8 RGB [H, W, 3] as displayed: rescaled to ``size`` (width, height
    of the coded stream) when it differs, then turned by its display matrix (a multiple of 90°)."""
    if (frame.width, frame.height) == size:
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    turns = rotation_of(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def open_video(path: str, threads: int = 1):
    """The container and its first video stream, decoding with ``threads`` threads."""
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = threads
    stream.thread_type = "AUTO" if threads > 1 else "SLICE"
    return container, stream


def stream_size(stream) -> tuple[int, int]:
    """(width, height) every frame is brought to: the stream's coded size."""
    return stream.codec_context.width, stream.codec_context.height


def read_frames(path: str, indices: list[int], threads: int = 1, seek: bool = True) -> np.ndarray:
    """Frames ``indices`` of the clip at ``path`` as uint8 RGB [len(indices), H, W, 3], by
    timestamp when ``seek`` (the manifest's verdict) and the timestamps allow, else in order."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DecodeError("empty file")
    try:
        if seek:
            container, stream = open_video(path, threads)
            with container:
                index = frame_index(container, stream)
                if not index.pts:
                    raise DecodeError("the clip has no frames")
                if index.ordered:
                    if max(indices) >= len(index.pts):
                        raise DecodeError(f"frame {max(indices)} asked of a clip with "
                                          f"{len(index.pts)} frames")
                    try:
                        return _by_timestamp(container, stream, index, indices)
                    except _SeekMiss:
                        pass
        container, stream = open_video(path, threads)  # in order: a fresh demuxer at the start
        with container:
            return _in_order(container, stream, indices)
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def _seek(container, stream, index: FrameIndex, target: int) -> Iterator[av.VideoFrame]:
    """Decoded frames from a key frame at or before ``target`` on, verified (see the module):
    the first frame out, past the aimed key frame, must be a key frame to the decoder and not
    after ``target``; the frames an open GOP puts before it are dropped."""
    k = bisect.bisect_right(index.keys, target) - 1
    for attempt in range(SEEK_TRIES):
        if k - attempt < 0:  # from the start, as a sequential decode begins
            container.seek(0)
            frames = container.decode(stream)
            first = next(frames, None)
            if first is None or first.pts != index.pts[0]:
                raise _SeekMiss
            return itertools.chain([first], frames)
        aim = index.keys[k - attempt]
        container.seek(aim, stream=stream, backward=True, any_frame=False)
        frames = container.decode(stream)
        first = next((f for f in frames if f.pts is None or f.pts >= aim), None)
        if first is None or first.pts is None:
            raise _SeekMiss
        if first.key_frame and first.pts <= target:
            start = first.pts
            return itertools.chain([first], (f for f in frames if f.pts is None or f.pts > start))
    raise _SeekMiss


def _by_timestamp(container, stream, index: FrameIndex, indices: list[int]) -> np.ndarray:
    size = stream_size(stream)
    wanted = {index.pts[i] for i in indices}
    got: dict[int, np.ndarray] = {}
    decoded, last = None, None  # the decoder's position: the last frame's timestamp
    for target in sorted(wanted):
        if target in got:
            continue
        k = bisect.bisect_right(index.keys, target) - 1
        key = index.keys[k] if k >= 0 else index.pts[0]
        if decoded is None or last is None or key > last or target < last:
            decoded = _seek(container, stream, index, target)
        for frame in decoded:
            if frame.pts is None:
                raise _SeekMiss
            last = frame.pts
            if frame.pts in wanted and frame.pts not in got:
                got[frame.pts] = picture(frame, size)
            if frame.pts >= target:
                break
        if target not in got:
            raise _SeekMiss
    return np.stack([got[index.pts[i]] for i in indices])


def _in_order(container, stream, indices: list[int]) -> np.ndarray:
    size = stream_size(stream)
    wanted, last = set(indices), max(indices)
    got: dict[int, np.ndarray] = {}
    count = 0
    for count, frame in enumerate(container.decode(stream), 1):
        if count - 1 in wanted:
            got[count - 1] = picture(frame, size)
        if count > last:
            break
    if last >= count:
        raise DecodeError(f"frame {last} asked of a clip with {count} frames")
    return np.stack([got[i] for i in indices])


__all__ = ["SEEK_TRIES", "DecodeError", "FrameIndex", "frame_index", "open_video", "picture",
           "read_frames", "rotation_of", "stream_size"]
