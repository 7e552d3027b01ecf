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

from dataloaders.pyav_decode import timestamps

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts"}
PATH_KEYS = ("video", "path", "filename", "file")
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
        yield from _entries_of_rows(({k.strip().lower(): v for k, v in r.items() if k}
                                     for r in reader), root)
        return
    for line in lines:
        cells = line.split(delimiter, 1) if delimiter else line.split(None, 1)
        label = cells[1].strip() if len(cells) > 1 else None
        extra = {}
        if label is not None:
            extra["label"] = int(label) if label.lstrip("-").isdigit() else label
        yield Entry(str(root / cells[0].strip()), extra)


def read_entries(source: str | Path, root: str | Path = "") -> list[Entry]:
    """The files named by a directory or an annotation file (paths relative to ``root``, or to
    the annotation's own directory when ``root`` is empty)."""
    source = Path(source)
    if source.is_dir():
        return [Entry(str(p)) for p in sorted(source.rglob("*"))
                if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
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


def probe(path: str) -> dict:
    """The manifest fields of one file, or ProbeError with the reason it cannot be used."""
    if not os.path.isfile(path):
        raise ProbeError("no such file")
    if os.path.getsize(path) == 0:
        raise ProbeError("empty file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ProbeError("no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name if stream.codec_context else ""
            if not codec or codec not in av.codecs_available:
                raise ProbeError(f"unsupported codec {codec or 'unknown'}")
            frames = len(timestamps(container, stream)[0])
            if frames == 0:
                raise ProbeError("zero frames")
            container.seek(0)
            first = next(container.decode(stream), None)
            if first is None:
                raise ProbeError("no frame decodes")
            rate = stream.average_rate or stream.guessed_rate
            duration = (float(stream.duration * stream.time_base) if stream.duration else
                        container.duration / 1e6 if container.duration else
                        frames / float(rate) if rate else 0.0)
            fps = float(rate) if rate else (frames / duration if duration else 0.0)
            return {"path": path, "num_frames": frames, "fps": round(fps, 4),
                    "duration": round(duration, 4), "codec": codec, "width": first.width,
                    "height": first.height, "audio": bool(container.streams.audio)}
    except ProbeError:
        raise
    except (av.FFmpegError, OSError, StopIteration, ValueError) as e:
        raise ProbeError(f"unreadable ({type(e).__name__}: {e})") from e


def _probe_entry(item: tuple[int, Entry]) -> tuple[int, dict, str | None]:
    index, entry = item
    try:
        return index, probe(entry.path) | entry.extra, None
    except ProbeError as e:
        return index, {"path": entry.path} | entry.extra, str(e)


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


def build_manifest(source: str | Path, out: str | Path, rejected: str | Path | None = None,
                   root: str | Path = "", workers: int = 0, progress: bool = True
                   ) -> tuple[int, int]:
    """Probe every file of ``source`` into ``out`` (and ``rejected``); returns (kept, rejected).

    Resumable: rows already in either file are kept and their files not probed again. Rows are
    appended as they come, then both files are rewritten atomically in input order.
    """
    out = Path(out)
    rejected = Path(rejected) if rejected else out.with_name("rejected.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    entries = read_entries(source, root)
    order = {e.path: i for i, e in enumerate(entries)}
    kept, bad = _read_jsonl(out), _read_jsonl(rejected)
    done = {r["path"] for r in kept + bad}
    todo = [(i, e) for i, e in enumerate(entries) if e.path not in done]
    bar = Progress(len(entries), len(entries) - len(todo)) if progress else None
    workers = workers or os.cpu_count() or 1
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
                    bad.append(row | {"reason": reason})
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
    return len(kept), len(bad)


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


__all__ = ["Entry", "Manifest", "ProbeError", "build_manifest", "probe", "read_entries"]
