"""Decoding chosen frames with PyAV (FFmpeg), for every codec FFmpeg reads.

Frame ``i`` is the ``i``-th frame in presentation order, as for DALI's ``frames`` argument, also
in a variable-frame-rate clip: the packets are demuxed once (no decoding) to list every frame's
timestamp and the key frames, then the decoder seeks to the key frame before a wanted frame only
when that skips work, and decodes forward from there.
"""

from __future__ import annotations

import bisect
import os

import av
import numpy as np


class DecodeError(Exception):
    """A clip that cannot give the frames asked of it; the message says why."""


def timestamps(container: av.container.InputContainer, stream) -> tuple[list[int], list[int]]:
    """The presentation timestamps of every frame (sorted) and of the key frames, from the
    demuxed packets: what frame ``i`` means here and the frame count of a manifest."""
    frames, keys = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        frames.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    frames.sort()
    keys.sort()
    return frames, keys


def read_frames(path: str, indices: list[int], threads: int = 1) -> np.ndarray:
    """Frames ``indices`` of the clip at ``path`` as uint8 RGB [len(indices), H, W, 3]."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DecodeError("empty file")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            stream.thread_type = "AUTO" if threads > 1 else "SLICE"
            return _decode(container, stream, indices)
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def _decode(container, stream, indices: list[int]) -> np.ndarray:
    frames, keys = timestamps(container, stream)
    if not frames:
        raise DecodeError("the clip has no frames")
    if max(indices) >= len(frames):
        raise DecodeError(f"frame {max(indices)} asked of a clip with {len(frames)} frames")
    wanted = {frames[i] for i in indices}
    got: dict[int, np.ndarray] = {}
    decoded = None
    last = None  # timestamp of the last frame decoded
    for target in sorted(wanted):
        if target in got:
            continue
        k = bisect.bisect_right(keys, target) - 1
        key = keys[k] if k >= 0 else frames[0]
        if decoded is None or last is None or key > last or target < last:
            container.seek(key, stream=stream, backward=True, any_frame=False)
            decoded = container.decode(stream)
        for frame in decoded:
            if frame.pts is None:
                raise DecodeError("a decoded frame has no timestamp")
            last = frame.pts
            if frame.pts in wanted and frame.pts not in got:
                got[frame.pts] = frame.to_ndarray(format="rgb24")
            if frame.pts >= target:
                break
        if target not in got:
            raise DecodeError(f"the decoder gave no frame at timestamp {target}")
    return np.stack([got[frames[i]] for i in indices])


__all__ = ["DecodeError", "read_frames", "timestamps"]
