"""Clips with known content, written with PyAV's encoders: test fixtures and benchmark inputs.

Frame ``i`` carries its own index in its colour: red encodes ``i % 16`` and green ``i // 16`` as one
of 16 levels 13 apart, which survives lossy coding, colour conversion, resizing, cropping and
flipping. Blue holds a gradient that moves with the frame, so the pictures are not flat.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVEL0, STEP = 24, 13
MAX_FRAMES = 256
CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm"), "mjpeg": ("mjpeg", ".avi")}


def frame_pixels(index: int, width: int, height: int) -> np.ndarray:
    """The RGB picture [height, width, 3] of frame ``index``."""
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"frame index {index} cannot be drawn (0..{MAX_FRAMES - 1})")
    y, x = np.mgrid[0:height, 0:width]
    picture = np.empty((height, width, 3), np.uint8)
    picture[..., 0] = LEVEL0 + STEP * (index % 16)
    picture[..., 1] = LEVEL0 + STEP * (index // 16)
    phase = 2 * np.pi * (x / max(width, 1) + y / max(height, 1) + index / 16)
    picture[..., 2] = (120 + 80 * np.sin(phase)).astype(np.uint8)
    return picture


def read_index(rgb: np.ndarray) -> int:
    """The index drawn into a decoded frame [H, W, 3] (uint8 RGB), from its median red and green."""
    red, green = (float(np.median(rgb[..., c])) for c in (0, 1))
    return int(round((red - LEVEL0) / STEP)) + 16 * int(round((green - LEVEL0) / STEP))


def write_clip(path: str | Path, codec: str = "vp9", frames: int = 32, width: int = 160,
               height: int = 96, fps: int = 25, vfr: bool = False, gop: int = 8,
               audio: bool = False, tone: float = 0.0,
               draw: Callable[[int, int, int], np.ndarray] = frame_pixels) -> Path:
    """Write a clip whose frame ``i`` shows index ``i`` (or ``draw(i, width, height)``); ``vfr``
    varies the frame spacing, ``gop`` is the key-frame interval, ``audio`` adds a sound track:
    silence, or a sine of ``tone`` Hz.

    ``path`` gets the codec's container suffix when it has none.
    """
    encoder, suffix = CODECS[codec]
    if vfr and codec == "mjpeg":
        raise ValueError("an AVI (MJPEG) clip cannot have a variable frame rate")
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(suffix)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        ticks = 3 if vfr else 1  # a VFR clip's frames are 1 or 3 ticks apart
        stream.codec_context.time_base = Fraction(1, fps * ticks)
        if codec == "h264":
            stream.options = {"crf": "18", "g": str(gop), "bf": "2"}
        elif codec == "vp9":
            stream.options = {"crf": "20", "b": "0", "g": str(gop), "deadline": "realtime",
                              "cpu-used": "8"}
        sound = None
        if audio:  # every stream exists before the first packet is written
            sound = container.add_stream("libopus" if codec == "vp9" else "aac", rate=48000)
            sound.layout = "mono"
        pts = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(draw(i, width, height), format="rgb24")
            frame.pts, frame.time_base = pts, stream.codec_context.time_base
            pts += (1 + 2 * (i % 2)) if vfr else 1
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if sound is not None:
            _sound(container, sound, frames / fps, tone)
    return path


IMAGE_FORMATS = {"png": ("png", "rgb24"), "jpeg": ("mjpeg", "yuvj420p")}


def write_image(path: str | Path, kind: str = "png", index: int = 0, width: int = 160,
                height: int = 96) -> Path:
    """Write a still image (``kind`` png or jpeg) showing index ``index`` as frame ``index`` of a
    clip would; returns the file (``.png`` / ``.jpg``)."""
    codec, pixels = IMAGE_FORMATS[kind]
    path = Path(path).with_suffix(".png" if kind == "png" else ".jpg")
    frame = av.VideoFrame.from_ndarray(frame_pixels(index, width, height), format="rgb24")
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, pixels
        for packet in stream.encode(frame.reformat(format=pixels)):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _sound(container, stream, seconds: float, tone: float) -> None:
    rate = stream.codec_context.sample_rate
    size = stream.codec_context.frame_size or 1024
    for start in range(0, int(seconds * rate), size):
        t = (start + np.arange(size)) / rate
        wave = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def truncate(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes, as an interrupted copy leaves it."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


__all__ = ["CODECS", "MAX_FRAMES", "frame_pixels", "read_index", "truncate", "write_clip"]
