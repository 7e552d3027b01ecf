"""Video data: manifests, InternVideo2 frame sampling, PyAV and DALI decoding, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import dali
from dataloaders.clips import read_index
from dataloaders.loader import MAX_ATTEMPTS, Batch, Clips, DataError, Feed
from dataloaders.manifest import Manifest, build_manifest, probe, read_entries
from dataloaders.pyav_decode import DecodeError, read_frames
from dataloaders.sampling import Sampling, frame_indices, position_row
from dataloaders.transform import MEAN_STD, crop_resize, normalize, to_clip
from megavideo.config import ConfigError, load_config
from megavideo.training.data import MAX_WORKERS, decode_workers

ROOT = Path(__file__).resolve().parents[2]
needs_dali = pytest.mark.skipif(dali.missing() is not None, reason=str(dali.missing()))


def indices_of(frames: np.ndarray) -> list[int]:
    return [read_index(f) for f in frames]


# -- sampling ---------------------------------------------------------------------------------

def test_one_frame_per_equal_segment_random_in_training_middle_in_eval():
    g = torch.Generator().manual_seed(0)
    for length in (16, 17, 40, 301):
        for _ in range(20):
            picked = frame_indices(length, 8, torch.rand(8, generator=g, dtype=torch.float64))
            for k, i in enumerate(picked):
                assert k * length // 8 <= i < (k + 1) * length / 8  # inside segment k
    assert frame_indices(40, 8) == [2, 7, 12, 17, 22, 27, 32, 37]  # the middles


def test_short_clips_repeat_frames_evenly_and_deterministically():
    assert frame_indices(5, 8) == [0, 0, 1, 2, 2, 3, 4, 4]
    assert frame_indices(1, 4) == [0, 0, 0, 0]
    s = Sampling(8, seed=3)
    draws = {tuple(s.draw(epoch=0, row=7, length=5, height=48, width=64).frames) for _ in range(3)}
    assert len(draws) == 1 and sorted(next(iter(draws))) == list(next(iter(draws)))


def test_draws_are_a_function_of_seed_epoch_and_sample():
    s = Sampling(16, seed=11)
    a = s.draw(2, 5, 300, 360, 640)
    assert a == s.draw(2, 5, 300, 360, 640)
    assert a != s.draw(3, 5, 300, 360, 640) and a != s.draw(2, 6, 300, 360, 640)
    assert a != Sampling(16, seed=12).draw(2, 5, 300, 360, 640)
    c = a.crop
    assert 0 <= c.top and c.top + c.height <= 360 and 0 <= c.left and c.left + c.width <= 640
    assert 0.5 * 360 * 640 * 0.95 <= c.height * c.width <= 360 * 640
    center = Sampling(16, seed=11, train=False).draw(2, 5, 300, 360, 640)
    assert (center.crop.top, center.crop.left, center.crop.height, center.crop.flip) == (0, 140, 360,
                                                                                        False)


def test_epochs_are_permutations_and_replacements_are_other_rows():
    rows = [position_row(5, p, 10)[1] for p in range(30)]
    for e in range(3):
        assert sorted(rows[10 * e:10 * e + 10]) == list(range(10))
    assert rows[:10] != rows[10:20]
    s = Sampling(8, seed=5)
    assert all(s.replacement(0, r, a, 10) != r for r in range(10) for a in range(5))


def _feed(clips, dp_rank, dp, gb=8, mb=2):
    return Feed(clips, gb, mb, dp_rank, dp, "pyav", workers=0)


def test_data_parallel_ranks_get_disjoint_shards_of_each_global_batch():
    feeds = [_feed(None, r, 2) for r in range(2)]
    for step in range(3):
        per_rank = [sum((f.positions(step, m) for m in range(2)), []) for f in feeds]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(8 * step, 8 * step + 8))


# -- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["h264", "vp9_odd", "vp9_short", "h264_vfr", "vp9_vfr", "mjpeg",
                                  "h264_audio"])
def test_pyav_decodes_exactly_the_sampled_frames(videos, name):
    path = str(videos[name])
    length = probe(path)["num_frames"]
    s = Sampling(16, seed=1)
    for row in range(4):
        frames = s.draw(0, row, length, 10, 10).frames
        assert indices_of(read_frames(path, frames)) == frames
    assert indices_of(read_frames(path, [length - 1, 0, 3 % length, 0])) == [length - 1, 0,
                                                                                3 % length, 0]


def test_pyav_reports_bad_files(videos):
    with pytest.raises(DecodeError, match="empty file"):
        read_frames(str(videos["empty"]), [0])
    with pytest.raises(DecodeError, match="Invalid data"):
        read_frames(__file__, [0])
    with pytest.raises(DecodeError, match="asked of a clip with"):
        read_frames(str(videos["truncated"]), [39])


def test_cpu_transform_shape_normalisation_and_flip(videos):
    frames = read_frames(str(videos["vp9"]), [0, 1])
    s = Sampling(2, seed=0, train=False)
    crop = s.draw(0, 0, 48, 96, 160).crop
    levels = crop_resize(frames, crop, 32)
    assert levels.shape == (3, 2, 32, 32) and levels.dtype == torch.uint8
    flipped = crop_resize(frames, type(crop)(crop.top, crop.left, crop.height, crop.width, True),
                          32)
    assert torch.equal(flipped, levels.flip(-1))
    clip = normalize(levels, "clip")
    assert clip.dtype == torch.float32
    assert torch.equal(clip, to_clip(frames, crop, 32, "clip"))
    mean = torch.tensor(MEAN_STD["clip"][0]).view(3, 1, 1, 1) * 255
    std = torch.tensor(MEAN_STD["clip"][1]).view(3, 1, 1, 1) * 255
    assert torch.equal(clip, (levels.float() - mean) / std)
    # frame 0's red is level 0 of the index code: (24/255 - mean) / std
    assert clip[0, 0].median().item() == pytest.approx((24 / 255 - 0.48145466) / 0.26862954,
                                                       abs=0.05)


@needs_dali
@pytest.mark.parametrize("name", ["vp9", "vp9_odd", "vp9_short", "vp9_vfr", "mjpeg", "vp9_audio"])
def test_dali_cpu_decodes_the_sampled_frames_and_matches_pyav(videos, name):
    """PyAV + torch vs DALI's CPU pipeline on the same draws, in 8-bit levels. Measured: mean
    absolute difference 0.2 to 1.9, largest single difference 24 (MJPEG's full-range chroma at
    edges; VP9 at most 12, on a 64x48 clip upscaled): colour conversion and resize filters differ.
    Bound: mean < 2.5, max <= 24."""
    path = str(videos[name])
    length = probe(path)["num_frames"]
    height, width = read_frames(path, [0]).shape[1:3]
    draws = [Sampling(8, seed=2, scale=(0.3, 1.0)).draw(0, r, length, height, width)
             for r in range(3)] + [Sampling(8, seed=2, train=False).draw(0, 0, length, height, width)]
    decoder = dali.DaliDecoder(40, batch_size=4, threads=1)
    encoded = [np.fromfile(path, np.uint8)] * len(draws)
    out, failed = decoder.decode(encoded, draws)
    assert not failed and out.shape == (4, 3, 8, 40, 40) and out.dtype == torch.uint8
    for clip, draw in zip(out, draws, strict=True):
        reference = crop_resize(read_frames(path, draw.frames), draw.crop, 40)
        levels = (clip.float() - reference.float()).abs()
        assert levels.mean() < 2.5 and levels.max() <= 24, (levels.mean(), levels.max())
    # the decoded frames are the sampled ones: read the index code back from the pixels
    assert indices_of(out[-1].permute(1, 2, 3, 0).numpy()) == draws[-1].frames


@needs_dali
def test_dali_failing_batch_is_rebuilt_from_the_good_samples(videos, tmp_path):
    rows = [str(videos[n]) for n in ("vp9", "truncated", "vp9_odd", "empty")]
    clips = _clips_over(rows, tmp_path, lengths={"truncated": 40})
    decoder = dali.DaliDecoder(32, batch_size=4, threads=1)
    positions = list(range(4))
    batch = clips.load_dali(positions, decoder)
    pyav = clips.load_pyav(positions)
    assert batch.video.shape == (4, 3, 8, 32, 32) and batch.video.dtype == torch.uint8
    assert sorted(p for p, _ in batch.skipped) == sorted(p for p, _ in pyav.skipped)
    assert {Path(p).stem for p, _ in batch.skipped} <= {"truncated", "empty"}
    assert batch.attempts == pyav.attempts == 4 + len(batch.skipped)
    # the same replacements on both paths (measured: 0.43 of 255 apart on average)
    assert (batch.video.float() - pyav.video.float()).abs().mean() < 2.5


@pytest.mark.skipif(not torch.cuda.is_available() or dali.missing() is not None,
                    reason="DALI's mixed (NVDEC) decoder needs a GPU and DALI")
def test_dali_mixed_decodes_h264_on_the_gpu(videos):
    path = str(videos["h264"])
    draw = Sampling(8, seed=0, train=False).draw(0, 0, 40, 78, 142)
    decoder = dali.DaliDecoder(32, batch_size=1, device_id=0)
    out, failed = decoder.decode([np.fromfile(path, np.uint8)], [draw])
    assert not failed and out.is_cuda and out.dtype == torch.uint8
    reference = crop_resize(read_frames(path, draw.frames), draw.crop, 32)
    assert (out[0].cpu().float() - reference.float()).abs().mean() < 2.5


# -- loader: bad files, determinism, resume ----------------------------------------------------

def _clips_over(paths: list[str], tmp_path: Path, lengths: dict[str, int] | None = None) -> Clips:
    """A manifest written straight from known facts (files broken after probing included)."""
    lengths = lengths or {}
    lines = []
    for p in paths:
        stem = Path(p).stem
        if stem in lengths or Path(p).stat().st_size == 0:
            row = {"path": p, "num_frames": lengths.get(stem, 10), "height": 96, "width": 160,
                   "codec": "vp9"}
        else:
            info = probe(p)
            row = {k: info[k] for k in ("path", "num_frames", "height", "width", "codec")}
        lines.append(json.dumps(row))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return Clips(Manifest(manifest), Sampling(8, seed=4), 32)


def test_bad_files_are_replaced_deterministically_and_counted(videos, tmp_path):
    clips = _clips_over([str(videos[n]) for n in ("empty", "vp9", "truncated", "h264")], tmp_path,
                        lengths={"truncated": 40})
    a = clips.load_pyav(list(range(8)))
    b = clips.load_pyav(list(range(8)))
    assert a.video.shape == (8, 3, 8, 32, 32)
    torch.testing.assert_close(a.video, b.video, rtol=0, atol=0)
    assert a.skipped == b.skipped and len(a.skipped) >= 2
    assert a.attempts == 8 + len(a.skipped)
    reasons = dict(a.skipped)
    assert reasons[str(videos["empty"])] == "empty file"
    assert "asked of a clip with" in reasons[str(videos["truncated"])]


def test_a_manifest_of_only_bad_files_stops_with_a_clear_message(videos, tmp_path):
    clips = _clips_over([str(videos["empty"])] * 3, tmp_path)
    with pytest.raises(DataError, match=f"{MAX_ATTEMPTS} files in a row failed to decode"):
        clips.load_pyav([0])
    # from a worker process too, as the same one sentence (not DataLoader's wrapped traceback)
    with pytest.raises(DataError, match=f"^sample 0: {MAX_ATTEMPTS} files in a row"):
        list(Feed(clips, 1, 1, 0, 1, "pyav", workers=1).iterate(0, 1, 0))


def test_a_resumed_feed_continues_with_the_next_unseen_clip(videos, tmp_path):
    clips = _clips_over([str(videos[n]) for n in ("vp9", "h264", "vp9_odd", "vp9_vfr")], tmp_path)
    feed = Feed(clips, 4, 2, 0, 1, "pyav", workers=0)
    whole = list(feed.iterate(0, 3, consumed_samples=0))
    resumed = list(Feed(clips, 4, 2, 0, 1, "pyav", workers=0).iterate(2, 3, consumed_samples=8))
    assert len(whole) == 6 and len(resumed) == 2
    for a, b in zip(whole[4:], resumed, strict=True):
        torch.testing.assert_close(a.video, b.video, rtol=0, atol=0)


def test_worker_processes_give_the_same_batches_as_the_main_process(videos, tmp_path):
    clips = _clips_over([str(videos[n]) for n in ("vp9", "h264", "empty")], tmp_path)
    inline = list(Feed(clips, 4, 2, 1, 2, "pyav", workers=0).iterate(0, 2, 0))
    workers = list(Feed(clips, 4, 2, 1, 2, "pyav", workers=2).iterate(0, 2, 0))
    for a, b in zip(inline, workers, strict=True):
        torch.testing.assert_close(a.video, b.video, rtol=0, atol=0)
        assert a.skipped == b.skipped


# -- manifests --------------------------------------------------------------------------------

def test_manifest_cli_probes_rejects_with_reasons_and_resumes(videos, tmp_path):
    root = videos["h264"].parent
    names = ["h264", "vp9_odd", "vp9_short", "h264_vfr", "vp9_audio", "empty"]
    annotation = tmp_path / "train.json"
    annotation.write_text(json.dumps(
        [{"video": videos[n].name, "caption": f"clip {n}"} for n in names]
        + [{"video": "missing.mp4", "caption": "gone"}]))
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 10)
    out = tmp_path / "out" / "manifest.jsonl"
    cmd = [sys.executable, "-m", "launch.manifest", str(annotation), "-o", str(out),
           "--root", str(root), "-j", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rejected = [json.loads(line) for line in (out.parent / "rejected.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).stem for r in rows] == names[:5]  # input order
    by = {Path(r["path"]).stem: r for r in rows}
    stat = videos["h264"].stat()
    assert by["h264"] | {"path": ""} == {
        "path": "", "num_frames": 40, "fps": 25.0, "duration": 1.6, "codec": "h264",
        "width": 142, "height": 78, "audio": False, "rotation": 0, "seek": True,
        "size_changes": False, "edit_list": False, "verify": "frames", "size": stat.st_size,
        "mtime": stat.st_mtime, "caption": "clip h264"}
    assert (by["vp9_odd"]["width"], by["vp9_odd"]["height"], by["vp9_odd"]["codec"]) == (97, 55,
                                                                                       "vp9")
    assert by["vp9_short"]["num_frames"] == 5 and by["h264_vfr"]["num_frames"] == 30
    assert by["vp9_audio"]["audio"] is True and by["vp9_audio"]["num_frames"] == 20
    assert {Path(r["path"]).name: r["reason"] for r in rejected} == {
        "empty.mp4": "empty file", "missing.mp4": "no such file"}
    assert "5 clips" in proc.stderr and "2 rejected; 7 files probed (--verify frames)" in proc.stderr
    # resumable: nothing is probed again, and a new input is probed and put in input order
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and out.read_text().count("\n") == 5
    assert "/7 probed" not in again.stderr and "0 files probed" in again.stderr  # nothing left
    annotation.write_text(json.dumps([{"video": videos["vp9"].name, "caption": "new"}]
                                     + json.loads(annotation.read_text())))
    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "8/8 probed" in third.stderr  # 7 known, 1 probed
    assert [Path(json.loads(line)["path"]).stem for line in out.read_text().splitlines()] == [
        "vp9"] + names[:5]
    table = tmp_path / "labels.csv"
    table.write_text(f"{videos['vp9'].name} 7\ngarbage.mp4 3\n")
    built = build_manifest(table, tmp_path / "k.jsonl", root=tmp_path, progress=False, workers=1)
    assert (built.kept, built.rejected) == (0, 2)  # vp9 is not under tmp_path; garbage unreadable
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "rejected.jsonl").read_text()
               .splitlines()]
    assert reasons[0] == "no such file" and reasons[1].startswith("not a video FFmpeg reads")


def test_annotation_formats(tmp_path):
    (tmp_path / "a.csv").write_text("path,caption\nx/1.mp4,a dog\nx/2.mp4,\"a cat, running\"\n")
    (tmp_path / "b.txt").write_text("k400/a.mp4 12\nk400/b.mp4 3\n")
    (tmp_path / "c.jsonl").write_text('{"path": "v.webm", "label": "jump"}\n')
    assert [(e.path, e.extra) for e in read_entries(tmp_path / "a.csv", "/data")] == [
        ("/data/x/1.mp4", {"caption": "a dog"}), ("/data/x/2.mp4", {"caption": "a cat, running"})]
    assert [e.extra["label"] for e in read_entries(tmp_path / "b.txt")] == [12, 3]
    assert read_entries(tmp_path / "c.jsonl")[0].path == str(tmp_path / "v.webm")
    (tmp_path / "bad.json").write_text('[{"clip": "x.mp4"}]')
    with pytest.raises(ValueError, match="none of the keys video, image, path"):
        read_entries(tmp_path / "bad.json")


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["data.source=files"], "data.source must be one of synthetic, manifest, got 'files'."),
    (["data.source=manifest"], "data.source=manifest needs data.manifest"),
    (["data.source=manifest", "data.manifest=/nonexistent.jsonl"],
     "data.manifest: no such file /nonexistent.jsonl."),
    (["data.backend=decord"], "data.backend must be one of auto, pyav, dali, got 'decord'."),
    (["data.normalize=laion"], "data.normalize must be one of imagenet, clip"),
    (["data.crop_scale=[0.8, 0.2]"], "data.crop_scale must be two numbers 0 < low <= high <= 1"),
    (["data.max_skip_rate=2"], "data.max_skip_rate must be in [0, 1], got 2.0."),
])
def test_bad_data_configs_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(ROOT / "configs" / "stage1_tiny.yaml", overrides)


@needs_dali
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only DALI codec rule")
def test_dali_without_a_gpu_refuses_h264_manifests_before_starting(stale_manifest):
    from megavideo.training.data import check

    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml", [
        "data.source=manifest", f"data.manifest={stale_manifest}", "data.backend=dali"])
    with pytest.raises(ConfigError, match=r"decodes only VP8, VP9 and MJPEG, but 5 clips .* h264"):
        check(cfg)


@needs_dali
def test_the_dali_feed_prefetches_the_same_micro_batches_as_the_pyav_feed(videos, tmp_path):
    clips = _clips_over([str(videos[n]) for n in ("vp9", "vp9_odd", "empty", "vp9_vfr")], tmp_path)
    pyav = list(Feed(clips, 4, 2, 0, 1, "pyav", workers=0).iterate(0, 3, 0))
    dali_feed = list(Feed(clips, 4, 2, 0, 1, "dali", workers=1, prefetch=2).iterate(0, 3, 0))
    assert len(dali_feed) == len(pyav) == 6
    for a, b in zip(pyav, dali_feed, strict=True):
        assert [p for p, _ in a.skipped] == [p for p, _ in b.skipped]
        assert a.attempts == b.attempts
        # levels of 255 (measured: at most 1.2 apart on average)
        assert (a.video.float() - b.video.float()).abs().mean() < 2.5
    assert sum(len(b.skipped) for b in dali_feed) >= 1


@pytest.mark.parametrize(("workers", "env", "expected"), [
    (3, {"SLURM_CPUS_PER_TASK": "12"}, 3),  # set: as set
    (None, {"SLURM_CPUS_PER_TASK": "12"}, 11),  # srun, one task per GPU: its CPUs, one training
    (None, {"SLURM_CPUS_PER_TASK": "64"}, MAX_WORKERS),
    (None, {"SLURM_CPUS_PER_TASK": "1"}, 0),  # decode in the training process
])
def test_decode_workers_follow_the_cpus_slurm_gives_the_task(workers, env, expected):
    cfg = load_config(ROOT / "configs/stage1_tiny.yaml",
                      [f"data.workers={'null' if workers is None else workers}"])
    assert cfg.data.workers == workers
    assert decode_workers(cfg.data, env) == expected


def test_decode_workers_under_torchrun_share_the_processes_cpus():
    data = load_config(ROOT / "configs/stage1_tiny.yaml").data
    cpus = len(os.sched_getaffinity(0))
    assert data.workers is None  # the default
    for ranks in (1, 2):
        env = {"LOCAL_WORLD_SIZE": str(ranks), "SLURM_CPUS_PER_TASK": "48"}  # one task, torchrun
        assert decode_workers(data, env) == max(min(cpus // ranks - 1, MAX_WORKERS), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA device")
def test_a_batch_pins_its_host_tensors():
    batch = Batch(torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8), rows=[0, 1],
                  fbank=torch.zeros(2, 5, 4), has_audio=torch.tensor([True, False]))
    pinned = batch.pin_memory()
    assert pinned.video.is_pinned() and pinned.fbank.is_pinned() and pinned.has_audio.is_pinned()
    assert pinned.rows == [0, 1] and torch.equal(pinned.video, batch.video)


class _Schema:
    """A DALI operator schema that has, or lacks, the decoder's frame-selection arguments."""

    def __init__(self, has_frames: bool) -> None:
        self.has_frames = has_frames

    def HasArgument(self, name: str) -> bool:  # noqa: N802 (DALI's name)
        return self.has_frames or name not in ("frames", "pad_mode")


@pytest.fixture
def dali_schemas(monkeypatch):
    """Make DALI report the schemas a test gives (None: the operator is absent)."""
    from nvidia.dali import backend

    def install(schemas: dict):
        monkeypatch.setattr(backend, "TryGetSchema", lambda name: schemas.get(name))
        dali.video_decoder.cache_clear()

    yield install
    dali.video_decoder.cache_clear()


@needs_dali
def test_dalis_decoder_is_found_by_its_arguments_not_by_the_import():
    assert dali.video_decoder() == (("decoders", "video"), "")
    assert dali.summary().startswith("DALI ") and "(fn.decoders.video)" in dali.summary()


@needs_dali
def test_a_dali_whose_decoder_lacks_frame_selection_is_not_used(dali_schemas, caplog,
                                                               stale_manifest):
    from megavideo.training.data import backend, check

    dali_schemas({"decoders__Video": _Schema(False), "experimental__decoders__Video": None})
    reason = dali.missing()
    assert "has no video decoder taking frames= and pad_mode=" in reason
    assert f"from DALI {dali.MIN_VERSION} on" in reason and "\n" not in reason
    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml", [
        "data.source=manifest", f"data.manifest={stale_manifest}", "data.backend=dali"])
    with caplog.at_level("INFO", logger="megavideo.training.data"):
        assert backend(cfg.data, cuda=True) == "dali"  # asked for by name: used as asked
        auto = load_config(ROOT / "configs" / "stage1_tiny.yaml").data
        assert backend(auto, cuda=True) == "pyav"
    assert f"PyAV on the CPU (DALI's NVDEC decoder not used: {reason})" in caplog.text
    with pytest.raises(ConfigError, match="data.backend=dali: NVIDIA DALI .* has no video decoder"):
        check(cfg)


@needs_dali
def test_older_dali_releases_decode_with_the_experimental_operator(dali_schemas):
    dali_schemas({"decoders__Video": None, "experimental__decoders__Video": _Schema(True)})
    assert dali.video_decoder() == (("experimental", "decoders", "video"), "")
