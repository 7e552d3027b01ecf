"""Files of the kinds real-world videos come as, which break frame indexing that trusts packets,
flags or headers: written with PyAV, each frame showing its index (:mod:`dataloaders.clips`).

=====================  ======================================================================
kind                   what it is, and what it breaks
=====================  ======================================================================
``edit_list``          an MP4 cut with ``-ss ... -c copy``: packets before the cut kept for
                       reference and discarded by an edit list (frames 12.. are shown)
``ts_bframes``         H.264 with B-frames in MPEG-TS (broadcast, camcorder ``.MTS``): a seek to
                       a key frame lands on the next one
``ps``                 MPEG-2 in MPEG-PS (``.mpg``): the decoder's timestamps are not the packets'
``avi_bframes``        MPEG-4 part 2 with B-frames in AVI (XviD-style): no presentation
                       timestamps in the container
``resolution_change``  VP9 in Matroska whose frames 20.. are coded at 128x80, not 160x96
``concat_ts``          two MPEG-TS files joined with ``cat`` (HLS downloads): timestamps restart
``rotation_90``,       phone videos: H.264 in MP4 with a display matrix turning them 90° or 270°
``rotation_270``       counterclockwise
=====================  ======================================================================
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from dataloaders.clips import frame_pixels

X264 = {"crf": "18", "g": "8", "bf": "2"}
VP9 = {"crf": "20", "b": "0", "g": "8", "deadline": "realtime", "cpu-used": "8"}
MPEG = {"g": "8", "bf": "2", "qmin": "1", "qmax": "2"}  # fine enough to read the indices back
KINDS = ("edit_list", "ts_bframes", "ps", "avi_bframes", "resolution_change", "concat_ts",
         "rotation_90", "rotation_270")
SUFFIXES = {"edit_list": ".mp4", "ts_bframes": ".ts", "ps": ".mpg", "avi_bframes": ".avi",
            "resolution_change": ".mkv", "concat_ts": ".ts", "rotation_90": ".mp4",
            "rotation_270": ".mp4"}


def _frames(encoder_context, first: int, count: int, width: int, height: int):
    """Encode frames ``first .. first + count - 1`` (their indices drawn in): the packets."""
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(frame_pixels(first + i, width, height), format="rgb24")
        frame.pts, frame.time_base = i, encoder_context.time_base
        yield from encoder_context.encode(frame)
    yield from encoder_context.encode(None)


def _encode(path: Path, container_format: str, encoder: str, count: int, options: dict,
            first: int = 0, width: int = 160, height: int = 96, rotation: int | None = None,
            pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = Fraction(1, 25)
        stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for packet in _frames(stream.codec_context, first, count, width, height):
            container.mux(packet)
    return path


def _edit_list(path: Path, scratch: Path) -> Path:
    """40 frames remuxed from the key frame before frame 12 on, with frame 12 at time 0."""
    source = _encode(scratch, "mp4", "libx264", 40, X264)
    with av.open(str(source)) as inp, av.open(str(path), "w", format="mp4") as out:
        video = inp.streams.video[0]
        packets = [p for p in inp.demux(video) if p.size]
        cut = sorted(p.pts for p in packets)[12]
        start = max(i for i, p in enumerate(packets) if p.is_keyframe and p.pts <= cut)
        stream = out.add_stream_from_template(video)
        for packet in packets[start:]:
            packet.pts, packet.dts = packet.pts - cut, packet.dts - cut
            packet.stream = stream
            out.mux(packet)
    source.unlink()
    return path


def _resolution_change(path: Path) -> Path:
    """Frames 0..19 at 160x96, then 20..39 from a second encoder at 128x80, in one stream."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        stream.options = VP9
        for packet in _frames(stream.codec_context, 0, 20, 160, 96):
            container.mux(packet)
        second = av.CodecContext.create("libvpx-vp9", "w")
        second.width, second.height, second.pix_fmt = 128, 80, "yuv420p"
        second.time_base = Fraction(1, 25)
        second.options = VP9
        for packet in _frames(second, 20, 20, 128, 80):
            packet.pts += 20
            packet.dts = packet.pts
            packet.stream, packet.time_base = stream, second.time_base
            container.mux(packet)
    return path


def write_odd_clip(path: str | Path, kind: str) -> Path:
    """Write a file of ``kind`` (:data:`KINDS`) at ``path`` (its suffix added when it has none)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(SUFFIXES[kind])
    scratch = path.with_name(f".{path.stem}.part")
    if kind == "edit_list":
        return _edit_list(path, scratch.with_suffix(".mp4"))
    if kind == "ts_bframes":
        return _encode(path, "mpegts", "libx264", 40, X264)
    if kind == "ps":
        return _encode(path, "mpeg", "mpeg2video", 40, MPEG)
    if kind == "avi_bframes":
        return _encode(path, "avi", "mpeg4", 40, MPEG)
    if kind == "resolution_change":
        return _resolution_change(path)
    if kind == "concat_ts":
        parts = [_encode(scratch.with_suffix(f".{i}.ts"), "mpegts", "libx264", 20, X264, 20 * i)
                 for i in range(2)]
        path.write_bytes(b"".join(p.read_bytes() for p in parts))
        for part in parts:
            part.unlink()
        return path
    if kind in ("rotation_90", "rotation_270"):
        return _encode(path, "mp4", "libx264", 20, X264, rotation=int(kind.split("_")[1]))
    raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")


__all__ = ["KINDS", "SUFFIXES", "write_odd_clip"]
