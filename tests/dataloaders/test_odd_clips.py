"""Real-world kinds of file (dataloaders.odd_clips) through the manifest and the decoder, against a
full sequential PyAV decode, pixel for pixel: each gives exactly those frames, or is rejected by
launch.manifest with one reason."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from dataloaders.clips import frame_pixels, read_index, write_clip
from dataloaders.manifest import Manifest, ProbeError, build_manifest, probe
from dataloaders.odd_clips import KINDS, write_odd_clip
from dataloaders.pyav_decode import read_frames
from megavideo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
# frames each file shows, in order (the edit list cuts frames 0..11 away)
SHOWN = {kind: list(range(12, 40)) if kind == "edit_list" else
         list(range(20)) if kind.startswith("rotation") else list(range(40)) for kind in KINDS}
UNSEEKABLE = {"concat_ts"}  # timestamps restart: decoded in order


def sequential(path: Path) -> list[np.ndarray]:
    """Every frame a plain sequential decode outputs, as a player shows it: at the stream's
    coded size, turned by the display matrix (a multiple of 90° counterclockwise)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        out = []
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
            out.append(np.rot90(rgb, (int(round(frame.rotation)) % 360) // 90))
        return out


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("odd")
    return {kind: write_odd_clip(d / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def truth(odd) -> dict[str, list[np.ndarray]]:
    return {kind: sequential(path) for kind, path in odd.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gives_exactly_the_frames_of_a_sequential_decode(odd, truth, kind):
    frames = truth[kind]
    assert [read_index(f) for f in frames] == SHOWN[kind]  # the files are what they claim
    row = probe(str(odd[kind]))
    assert row["num_frames"] == len(frames) and row["seek"] is (kind not in UNSEEKABLE)
    assert (row["height"], row["width"]) == frames[0].shape[:2]
    rng = random.Random(kind)
    draws = [[len(frames) - 1], [0], *(sorted(rng.sample(range(len(frames)), 6))
                                       for _ in range(4))]
    for indices in draws:
        for seek in (True, row["seek"]):
            got = read_frames(str(odd[kind]), indices, seek=seek)
            assert all(np.array_equal(g, frames[i]) for g, i in zip(got, indices, strict=True)), \
                (kind, indices, seek)


@pytest.mark.parametrize(("kind", "turns"), [("rotation_90", 1), ("rotation_270", 3)])
def test_a_phone_video_is_turned_as_its_display_matrix_says(odd, truth, kind, turns):
    """The decoded frame matches the drawn picture turned counterclockwise (as ffmpeg's
    autorotate turns it), not the coded one (lossy coding: compared on the mean)."""
    row = probe(str(odd[kind]))
    assert (row["rotation"], row["width"], row["height"]) == (turns * 90, 96, 160)
    shown = truth[kind][5].astype(float)
    drawn = frame_pixels(5, 160, 96)
    assert np.abs(shown - np.rot90(drawn, turns)).mean() < 3.0
    assert np.abs(shown - np.rot90(drawn, (turns + 2) % 4)).mean() > 10.0


def test_manifest_fields_say_what_each_kind_is(odd):
    rows = {kind: probe(str(path)) for kind, path in odd.items()}
    assert rows["edit_list"]["edit_list"] and rows["edit_list"]["num_frames"] == 28
    assert rows["resolution_change"]["size_changes"]
    assert (rows["resolution_change"]["width"], rows["resolution_change"]["height"]) == (160, 96)
    assert not any(rows[k]["size_changes"] or rows[k]["edit_list"] for k in ("ts_bframes", "ps"))
    assert rows["concat_ts"]["num_frames"] == 40  # both segments, counted as decoded
    assert {r["codec"] for r in rows.values()} == {"h264", "mpeg2video", "mpeg4", "vp9"}


def test_the_verify_levels(odd):
    with pytest.raises(ProbeError, match="timestamps that are not monotonic"):
        probe(str(odd["concat_ts"]), "quick")
    quick = probe(str(odd["ts_bframes"]), "quick")
    assert quick["num_frames"] == 40 and quick["verify"] == "quick"
    seeks = {kind: probe(str(path), "seeks")["seek"] for kind, path in odd.items()}
    assert seeks == {kind: kind not in UNSEEKABLE for kind in KINDS}


def test_every_file_a_directory_holds_is_kept_or_rejected_with_a_reason(odd, tmp_path):
    d = tmp_path / "phone_dump"
    d.mkdir()
    for path in odd.values():
        (d / path.name).write_bytes(path.read_bytes())
    clip = write_clip(d / "camcorder", "h264", frames=12)
    for suffix in (".MTS", ".m2ts", ".3gp", ".wmv"):  # video by content, whatever the name
        (d / f"copy{suffix}").write_bytes(clip.read_bytes())
    (d / "folder.mp4").mkdir()
    (d / "gone.mp4").symlink_to(d / "nowhere.mp4")
    (d / "notes.txt").write_text("not a video\n" * 20)
    out = tmp_path / "manifest.jsonl"
    built = build_manifest(d, out, workers=1, progress=False)
    kept = {Path(r["path"]).name for r in map(json.loads, out.read_text().splitlines())}
    rejected = {Path(r["path"]).name: r["reason"] for r in map(
        json.loads, (tmp_path / "rejected.jsonl").read_text().splitlines())}
    seen = {p.name for p in d.iterdir()}
    assert kept | set(rejected) == seen and not kept & set(rejected)
    assert {f"copy{s}" for s in (".MTS", ".m2ts", ".3gp", ".wmv")} <= kept
    assert {path.name for path in odd.values()} <= kept
    assert rejected["folder.mp4"] == "a directory"
    assert rejected["gone.mp4"].startswith("a broken symbolic link")
    assert rejected["notes.txt"].startswith("not a video FFmpeg reads")
    assert (built.kept, built.rejected) == (len(kept), 3)


def test_running_the_manifest_again_probes_what_changed(tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    paths = [write_clip(d / f"clip{i}", "vp9", frames=10 + i) for i in range(4)]
    out = tmp_path / "manifest.jsonl"
    assert build_manifest(d, out, workers=1, progress=False).kept == 4
    paths[0].unlink()  # deleted
    paths[1].write_bytes(paths[1].read_bytes()[:200])  # truncated by a failed copy
    write_clip(d / "clip2", "vp9", frames=30)  # replaced by a longer take
    cmd = [sys.executable, "-m", "launch.manifest", str(d), "-o", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("3 clips" not in proc.stderr and "2 clips in" in proc.stderr and "2 files probed"
            in proc.stderr and "2 probed again (changed since), 1 vanished" in proc.stderr)
    rows = {Path(r["path"]).stem: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"clip2", "clip3"} and rows["clip2"]["num_frames"] == 30
    rejected = {Path(r["path"]).stem: r["reason"] for r in map(
        json.loads, (tmp_path / "rejected.jsonl").read_text().splitlines())}
    assert set(rejected) == {"clip1"}
    stricter = build_manifest(d, out, workers=1, progress=False, verify="seeks")
    assert (stricter.probed, stricter.reprobed) == (2, 2)  # the kept ones; clip1 is as it was


def test_dali_gets_only_what_it_decodes_exactly(odd, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    write_clip(d / "plain", "vp9", frames=16)
    for kind in ("rotation_90", "concat_ts"):
        (d / odd[kind].name).write_bytes(odd[kind].read_bytes())
    out = tmp_path / "manifest.jsonl"
    build_manifest(d, out, workers=1, progress=False)
    manifest = Manifest(out)
    assert sorted(manifest.dali_blocked.values()) == ["not seekable by timestamp",
                                                     "rotated by its display matrix"]
    from dataloaders import dali
    from megavideo.training import data

    if dali.missing() is None:
        cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml", [
            "data.source=manifest", f"data.manifest={out}", "data.backend=dali"])
        with pytest.raises(ConfigError, match=r"^data.backend=dali: 2 of 3 clips of .* need PyAV "
                                              r"\(e.g. .*\); rebuild the manifest with"):
            data.check(cfg)
    assert data.backend(load_config(ROOT / "configs" / "stage1_tiny.yaml").data, True,
                        manifest) == "pyav"
    strict = build_manifest(d, tmp_path / "dali.jsonl", tmp_path / "dali_rejected.jsonl",
                            workers=1, progress=False, dali=True)
    assert (strict.kept, strict.rejected) == (1, 2)
    reasons = [json.loads(line)["reason"] for line in
               (tmp_path / "dali_rejected.jsonl").read_text().splitlines()]
    assert all(r.startswith("DALI cannot decode it exactly: ") for r in reasons)
    assert os.path.exists(out)


def test_the_frame_rate_of_the_same_vfr_content_does_not_depend_on_the_container(tmp_path):
    """Frames 1 and 3 ticks of 1/75 s apart: the rate comes from the timestamps, (n - 1) / span."""
    rows = [probe(str(write_clip(tmp_path / f"vfr_{codec}", codec, frames=30, vfr=True)))
            for codec in ("h264", "vp9")]
    expected = 29 / ((15 * 1 + 14 * 3) / 75)  # 30 frames over 15 short and 14 long gaps
    assert [r["fps"] for r in rows] == [round(expected, 4)] * 2


def test_a_csv_label_is_an_integer_with_or_without_a_header(tmp_path):
    from dataloaders.manifest import read_entries

    (tmp_path / "plain.csv").write_text("a.mp4,3\nb.mp4,cat\n")
    (tmp_path / "header.csv").write_text("path,label\na.mp4,3\nb.mp4,cat\n")
    for name in ("plain.csv", "header.csv"):
        assert [e.extra["label"] for e in read_entries(tmp_path / name)] == [3, "cat"], name


def test_the_codec_is_named_not_its_decoder(tmp_path):
    """An AV1 clip decodes with libdav1d; the manifest says av1."""
    from fractions import Fraction

    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libsvtav1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, 160, 96), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "libdav1d"
    row = probe(str(path))
    assert (row["codec"], row["num_frames"]) == ("av1", 8)
