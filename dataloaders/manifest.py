"""Manifests: one JSON line per usable clip, probed once, so training never has to guess.

A row holds the path, frame count (counted from the demuxed packets: DALI has no frame-count
operator and containers' headers are often wrong), fps, duration, codec, width, height, whether
there is audio, and the caption or label of the annotation it came from. Files that cannot be
used go to ``rejected.jsonl`` beside the manifest, with the reason.

Inputs: a directory (searched for video files), or an annotation file in the official
InternVideo2 formats: JSON / JSON Lines with ``video`` (or ``path``) and ``caption`` or
``label``, or CSV/TXT lines ``path label`` (space- or comma-separated, optionally with a header).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import av
import numpy as np

from dataloaders.pyav_decode import (
    DecodeError,
    frame_index,
    open_video,
    picture,
    read_frames,
    rotation_of,
    stream_size,
)

# names a directory is rejected for rather than searched under (files are probed whatever their name)
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts",
                  ".mts", ".m2ts", ".3gp", ".wmv", ".asf", ".ogv", ".gif", ".vob"}
PATH_KEYS = ("video", "image", "path", "filename", "file")  # image: the official image-text rows
CARRIED_KEYS = ("label", "text")  # plus every key naming a caption or speech (see _carried)
QA_KEYS = ("QA", "qa")  # stage 3's instruction data: [{"i": ..., "q": ..., "a": ...}, ...]


def _carried(row: dict) -> dict:
    """What an annotation row says about its clip: ``label``, ``text`` and every caption or
    speech transcript (keys containing ``caption`` or ``asr``: InternVideo2's ``caption``,
    ``captions``, ``selected_audio_caption``, ``asr_captions``, ``avs_captions``, ...)."""
    return {k: v for k, v in row.items()
            if k in CARRIED_KEYS or k in QA_KEYS or "caption" in k or "asr" in k}


class ProbeError(Exception):
    """Why a file cannot be used."""


@dataclass(frozen=True)
class Entry:
    """One input item: a file and what its annotation says about it."""

    path: str
    extra: dict = field(default_factory=dict)


def _texts_of(value) -> list[str]:
    """The usable texts of a carried value: a non-blank string, or the non-blank strings of a list."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [v for v in values if isinstance(v, str) and v.strip()]


def usable_qa(value) -> bool:
    """A list of question-answer pairs, each with a string answer ``a``."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, dict) and isinstance(p.get("a"), str) for p in value)


def _entries_of_rows(rows: Iterable[dict], root: Path) -> Iterator[Entry]:
    for row in rows:
        key = next((k for k in PATH_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"an annotation row has none of the keys {', '.join(PATH_KEYS)}: "
                             f"{json.dumps(row)[:120]}")
        yield Entry(str(root / row[key]), _carried(row))


def _entries_of_table(path: Path, root: Path) -> Iterator[Entry]:
    with open(path, newline="") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if not lines:
        return
    delimiter = "," if "," in lines[0] else None
    first = [c.strip() for c in (lines[0].split(delimiter))]
    if first[0].lower() in PATH_KEYS:  # a header
        reader = csv.DictReader(lines, delimiter=delimiter or " ", skipinitialspace=True)
        rows = ({k.strip().lower(): v for k, v in r.items() if k} for r in reader)
        yield from _entries_of_rows(({k: _label(v) if k == "label" else v for k, v in r.items()}
                                     for r in rows), root)
        return
    for line in lines:
        cells = line.split(delimiter, 1) if delimiter else line.split(None, 1)
        extra = {"label": _label(cells[1])} if len(cells) > 1 else {}
        yield Entry(str(root / cells[0].strip()), extra)


def _label(text: str):
    """A table's label: an integer class when it reads as one, else the text (with or without a
    header line alike)."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def read_entries(source: str | Path, root: str | Path = "") -> list[Entry]:
    """The files named by a directory or an annotation file (paths relative to ``root``, or to
    the annotation's own directory when ``root`` is empty)."""
    source = Path(source)
    if source.is_dir():  # every file, link or video-named directory: videos are known by content
        return [Entry(str(p)) for p in sorted(source.rglob("*"))
                if not p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES]
    if not source.is_file():
        raise FileNotFoundError(f"{source} is neither a directory nor a file")
    base = Path(root) if root else source.parent
    suffix = source.suffix.lower()
    if suffix == ".json":
        return list(_entries_of_rows(json.loads(source.read_text()), base))
    if suffix == ".jsonl":
        return list(_entries_of_rows((json.loads(line) for line in
                                      source.read_text().splitlines() if line.strip()), base))
    return list(_entries_of_table(source, base))


VERIFY_LEVELS = ("quick", "frames", "seeks")  # launch.manifest --verify, cheapest first
SEEK_CHECKS = 8  # frames read by timestamp and compared at --verify seeks


def _file_problem(path: str) -> str | None:
    """Why ``path`` is not a file to open, or None."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)})"
    if os.path.isdir(path):
        return "a directory"
    if not os.path.isfile(path):
        return "no such file"
    if os.path.getsize(path) == 0:
        return "empty file"
    return None


def _frame_rate(index, frames: int, time_base: float, header_fps: float) -> tuple[float, float]:
    """(fps, duration): from the frames' timestamps (in ``time_base`` seconds) when they are
    ordered (the same for the same content in any container, VFR too), else the header's."""
    if index.ordered and frames > 1 and time_base and index.pts[-1] > index.pts[0]:
        fps = (frames - 1) / ((index.pts[-1] - index.pts[0]) * time_base)
        return fps, frames / fps
    return header_fps, frames / header_fps if header_fps else 0.0


def _digest(rgb: np.ndarray) -> str:
    """A decoded picture's pixels, in 16 hex digits (to compare two decodes of a frame)."""
    return hashlib.blake2b(rgb.tobytes(), digest_size=8).hexdigest()


def _decode_all(container, stream, hashes: bool) -> tuple[list, set, list[str], int]:
    """One sequential decode: the frames' timestamps, their sizes, their pixels' digests (with
    ``hashes``) and the first frame's rotation."""
    size = stream_size(stream)
    stamps, sizes, digests, rotation = [], set(), [], None
    for frame in container.decode(stream):
        stamps.append(frame.pts)
        sizes.add((frame.width, frame.height))
        if rotation is None:
            rotation = rotation_of(frame)
        if hashes:
            digests.append(_digest(picture(frame, size)))
    return stamps, sizes, digests, rotation or 0


def _seeks_agree(path: str, frames: int, digests: list[str]) -> bool:
    """Frames spread over the clip read by timestamp equal the sequential decode's."""
    wanted = sorted({int(i) for i in np.linspace(0, frames - 1, min(SEEK_CHECKS, frames))})
    got = read_frames(path, wanted, seek=True)
    return all(_digest(rgb) == digests[i] for rgb, i in zip(got, wanted, strict=True))


def probe(path: str, verify: str = "frames") -> dict:
    """The manifest fields of one file, or ProbeError with the reason it cannot be used.

    ``verify``: ``quick`` demuxes the packets and decodes the first frame; ``frames`` decodes
    every frame once (the frame count is what the decoder outputs; the timestamps, sizes and
    rotation are checked; ``seek`` says whether frames can be read by timestamp); ``seeks`` also
    reads frames spread over the clip by timestamp and compares their pixels with that decode.
    """
    problem = _file_problem(path)
    if problem:
        raise ProbeError(problem)
    stat = os.stat(path)
    try:
        container, stream = open_video(path)
    except DecodeError as e:
        raise ProbeError(str(e)) from None
    except av.InvalidDataError as e:
        raise ProbeError(f"not a video FFmpeg reads ({e})") from None
    except (av.FFmpegError, OSError) as e:
        raise ProbeError(f"unreadable ({type(e).__name__}: {e})") from e
    try:
        with contextlib.ExitStack() as opened:
            opened.enter_context(container)
            codec_context = stream.codec_context
            if codec_context is None or codec_context.codec is None:
                raise ProbeError("unsupported codec unknown")
            codec = codec_context.codec.canonical_name
            width, height = stream_size(stream)  # before decoding, which may change it
            index = frame_index(container, stream)
            if not index.pts:
                raise ProbeError("zero frames")
            picture = len(index.pts) == 1  # a still image: a fresh demuxer, not a seek, rewinds it
            if picture:
                container, stream = open_video(path)
                opened.enter_context(container)
            else:
                container.seek(0)
            if verify == "quick":
                first = next(container.decode(stream), None)
                if first is None:
                    raise ProbeError("no frame decodes")
                stamps, sizes, rotation = None, {(first.width, first.height)}, rotation_of(first)
                digests: list[str] = []
            else:
                stamps, sizes, digests, rotation = _decode_all(container, stream,
                                                               verify == "seeks")
                if not stamps:
                    raise ProbeError("no frame decodes")
            audio = bool(container.streams.audio)
            # read while the container is open: its streams are freed with it
            time_base = float(stream.time_base) if stream.time_base else 0.0
            rate = stream.average_rate or stream.guessed_rate
            header_fps = float(rate) if rate else 0.0
    except ProbeError:
        raise
    except (av.FFmpegError, OSError, StopIteration, ValueError) as e:
        raise ProbeError(f"unreadable ({type(e).__name__}: {e})") from e
    if rotation % 90:
        raise ProbeError(f"a display matrix rotating by {rotation}°, not a multiple of 90°")
    frames = len(stamps) if stamps is not None else len(index.pts)
    seek = not picture and index.ordered and (
        stamps is None or None not in stamps and sorted(stamps) == index.pts)
    if seek and verify == "seeks":
        try:
            seek = _seeks_agree(path, frames, digests)
        except DecodeError:
            seek = False
    if stamps is None and not index.ordered:
        raise ProbeError("timestamps that are not monotonic (e.g. joined MPEG-TS segments): "
                         "probe it with --verify frames, which counts the decoded frames")
    fps, duration = _frame_rate(index, frames, time_base, header_fps)
    if not (width and height):
        width, height = next(iter(sizes))
    if rotation in (90, 270):
        width, height = height, width
    return {"path": path, "num_frames": frames, "fps": round(fps, 4),
            "duration": round(duration, 4), "codec": codec, "width": width, "height": height,
            "audio": audio, "rotation": rotation, "seek": seek,
            "size_changes": len(sizes) > 1, "edit_list": index.discarded > 0,
            "verify": verify, "size": stat.st_size, "mtime": stat.st_mtime}


DALI_UNSUPPORTED = {"rotation": "rotated by its display matrix", "seek": "not seekable by "
                    "timestamp", "size_changes": "changing resolution", "edit_list": "cut by an "
                    "edit list"}  # what DALI's decoder cannot give exactly, by manifest field


def dali_blocker(row: dict) -> str | None:
    """Why DALI's decoder would not give a row's frames exactly (the PyAV path does), or None."""
    for key, why in DALI_UNSUPPORTED.items():
        if (not row.get(key, True)) if key == "seek" else row.get(key):
            return why
    return None


def _probe_entry(item: tuple[int, Entry, str, bool]) -> tuple[int, dict, str | None]:
    index, entry, verify, dali = item
    try:
        row = probe(entry.path, verify) | entry.extra
    except ProbeError as e:
        return index, {"path": entry.path} | entry.extra, str(e)
    why = dali_blocker(row) if dali else None
    return index, row, f"DALI cannot decode it exactly: {why}" if why else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interrupted run: probe that file again
            continue
    return rows


def _write_sorted(path: Path, rows: list[dict], order: dict[str, int]) -> None:
    rows = sorted(rows, key=lambda r: order.get(r["path"], len(order)))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


class Progress:
    """A one-line progress bar on a terminal, a log line every 10 s otherwise."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.rejected = total, done, 0
        self.start = self.shown = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.first = done

    def update(self, rejected: bool) -> None:
        self.done += 1
        self.rejected += rejected
        now = time.monotonic()
        if self.done == self.total or now - self.shown > (0.2 if self.tty else 10):
            self.shown = now
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0
            width = 30
            bar = "#" * int(width * self.done / max(self.total, 1))
            line = (f"[{bar:<{width}}] {self.done}/{self.total} probed, {self.rejected} rejected, "
                    f"{rate:.1f} files/s, eta {eta:.0f} s")
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


@dataclass(frozen=True)
class Built:
    """What :func:`build_manifest` did: rows in each file, and of the rows an earlier run wrote,
    how many were probed again (their file changed, or a stricter ``verify``), how many files had
    vanished and how many rows the source no longer lists."""

    kept: int
    rejected: int
    probed: int = 0
    reprobed: int = 0
    vanished: int = 0
    dropped: int = 0


def _stamp(path: str) -> dict:
    """The size and modification time a row records of its file (none for a missing file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return {}
    return {"size": stat.st_size, "mtime": stat.st_mtime}


def _still_good(row: dict, verify: str, rejected: bool) -> bool:
    """An earlier run's row holds: its file is as it was then (size, modification time) and, if
    it was kept, it was verified at least as strictly as now asked."""
    if _stamp(row["path"]) != {k: row[k] for k in ("size", "mtime") if k in row}:
        return False
    level = row.get("verify", "quick")
    return rejected or (level in VERIFY_LEVELS
                        and VERIFY_LEVELS.index(level) >= VERIFY_LEVELS.index(verify))


def build_manifest(source: str | Path, out: str | Path, rejected: str | Path | None = None,
                   root: str | Path = "", workers: int = 0, progress: bool = True,
                   verify: str = "frames", dali: bool = False) -> Built:
    """Probe every file of ``source`` into ``out`` (and ``rejected``).

    Every file ``source`` names or a directory holds ends in one of the two, whatever its
    suffix (videos are recognised by content). ``verify``: see :func:`probe`; ``dali``: also
    reject what DALI's decoder would not give exactly (:func:`dali_blocker`). Resumable and
    incremental: the rows an earlier run wrote are kept while their file is unchanged (size,
    modification time) and was verified as strictly; changed files are probed again, vanished
    ones rejected, rows the source no longer lists dropped. Rows are appended as they come, then
    both files are rewritten atomically in input order.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}")
    out = Path(out)
    rejected = Path(rejected) if rejected else out.with_name("rejected.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    own = {str(p.resolve()) for p in (out, rejected)}
    entries = [e for e in read_entries(source, root) if str(Path(e.path).resolve()) not in own]
    order = {e.path: i for i, e in enumerate(entries)}
    extras = {e.path: e.extra for e in entries}
    kept, bad, done = [], [], set()
    reprobed = vanished = dropped = 0
    for rows, is_bad in ((_read_jsonl(out), False), (_read_jsonl(rejected), True)):
        for row in rows:
            path = row["path"]
            if path in done:
                continue
            if path not in order:
                if os.path.lexists(path):
                    dropped += 1
                else:
                    vanished += 1
                continue
            if not _still_good(row, verify, is_bad) or (dali and not is_bad and dali_blocker(row)):
                reprobed += 1
                vanished += not os.path.lexists(path)
                continue
            done.add(path)
            fresh = {k: v for k, v in row.items() if k not in _carried(row)} | extras[path]
            (bad if is_bad else kept).append(fresh)
    todo = [(i, e, verify, dali) for i, e in enumerate(entries) if e.path not in done]
    bar = Progress(len(entries), len(entries) - len(todo)) if progress else None
    workers = workers or os.cpu_count() or 1
    _write_sorted(out, kept, order)
    _write_sorted(rejected, bad, order)
    with open(out, "a") as good_file, open(rejected, "a") as bad_file:
        if workers > 1 and len(todo) > 1:
            pool = get_context("spawn").Pool(workers)
            results = pool.imap_unordered(_probe_entry, todo, chunksize=4)
        else:
            pool, results = None, map(_probe_entry, todo)
        try:
            for _, row, reason in results:
                if reason is None:
                    kept.append(row)
                    good_file.write(json.dumps(row) + "\n")
                    good_file.flush()
                else:
                    bad.append(row | _stamp(row["path"]) | {"reason": reason})
                    bad_file.write(json.dumps(bad[-1]) + "\n")
                    bad_file.flush()
                if bar:
                    bar.update(reason is not None)
        finally:
            if pool is not None:
                pool.terminate()
    if bar:
        bar.close()
    _write_sorted(out, kept, order)
    _write_sorted(rejected, bad, order)
    return Built(len(kept), len(bad), len(todo), reprobed, vanished, dropped)


class Manifest:
    """The columns training needs, compact enough for millions of rows in every rank and decode
    worker: the paths as one UTF-8 buffer with offsets, the numbers as int32 arrays. Measured:
    11.8 MB for 200k rows with 42-character paths (42 MB as Python strings and ints). Captions
    and transcripts sit in one more buffer (each row's JSON), plus per key the rows that hold a
    usable text, so stage 2's caption check reads no JSON again."""

    def __init__(self, path: str | Path) -> None:
        self.file = Path(path)
        paths, frames, heights, widths, codes = bytearray(), [], [], [], []
        ends, fps, audio, texts, text_ends = [], [], [], bytearray(), []
        seekable, blocked = [], {}  # by timestamp; rows DALI cannot decode exactly -> why
        with_text: dict[str, list[int]] = {}  # key -> rows holding a usable text under it
        index: dict[str, int] = {}
        digest = hashlib.blake2b(digest_size=8)
        with open(self.file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name, n = str(row["path"]), int(row["num_frames"])
                    h, w, codec = int(row["height"]), int(row["width"]), str(row["codec"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{self.file}:{number} is not a manifest row "
                                     f"({type(e).__name__}: {e})") from e
                paths += name.encode()
                ends.append(len(paths))
                frames.append(n)
                heights.append(h)
                widths.append(w)
                codes.append(index.setdefault(codec, len(index)))
                fps.append(float(row.get("fps") or 0.0))
                audio.append(bool(row.get("audio")))
                seekable.append(bool(row.get("seek", True)))
                why = dali_blocker(row)
                if why:
                    blocked[len(ends) - 1] = why
                carried = _carried(row)
                for key, value in carried.items():
                    if _texts_of(value) or key in QA_KEYS and usable_qa(value):
                        with_text.setdefault(key, []).append(len(ends) - 1)
                texts += json.dumps(carried).encode() if carried else b""
                text_ends.append(len(texts))
                digest.update(f"{name}\0{n}\n".encode())
        self.codec_names: list[str] = list(index)
        self._paths = bytes(paths)
        self._ends = np.array(ends, np.int64)
        self.num_frames = np.array(frames, np.int32)
        self.heights = np.array(heights, np.int32)
        self.widths = np.array(widths, np.int32)
        self.codec_ids = np.array(codes, np.uint8 if len(index) < 256 else np.int32)
        self.fps = np.array(fps, np.float32)
        self.has_audio = np.array(audio, np.bool_)
        self.seekable = np.array(seekable, np.bool_)
        self.dali_blocked: dict[int, str] = blocked  # rows DALI cannot decode exactly -> why
        self._texts = bytes(texts)
        self._text_ends = np.array(text_ends, np.int64)
        self._with_text = {k: np.array(rows, np.int64) for k, rows in with_text.items()}
        self.digest = digest.hexdigest()

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, row: int) -> str:
        start = int(self._ends[row - 1]) if row else 0
        return self._paths[start:int(self._ends[row])].decode()

    def texts(self, row: int) -> dict:
        """The row's captions, labels and transcripts (each a string or a list of strings)."""
        start = int(self._text_ends[row - 1]) if row else 0
        raw = self._texts[start:int(self._text_ends[row])]
        return json.loads(raw) if raw else {}

    def captions(self, row: int, keys: list[str]) -> list[str]:
        """Every caption the listed keys hold for a row (a key's value: a string or a list)."""
        texts = self.texts(row)
        return [c for key in keys for c in _texts_of(texts.get(key))]

    def without_text(self, keys: list[str]) -> np.ndarray:
        """The rows holding no usable text under any of the keys (from what loading recorded)."""
        covered = np.zeros(len(self), np.bool_)
        for key in keys:
            covered[self._with_text.get(key, np.zeros(0, np.int64))] = True
        return np.flatnonzero(~covered)

    def codec(self, row: int) -> str:
        return self.codec_names[self.codec_ids[row]]

    def codec_counts(self) -> dict[str, int]:
        counts = np.bincount(self.codec_ids, minlength=len(self.codec_names))
        return {name: int(c) for name, c in zip(self.codec_names, counts, strict=True)}


__all__ = ["DALI_UNSUPPORTED", "VERIFY_LEVELS", "Built", "Entry", "Manifest", "ProbeError",
           "build_manifest", "dali_blocker", "probe", "read_entries"]
