"""Shared fixtures: video files written once per session with PyAV's encoders (dataloaders/clips.py),
and the attention-backend variables megatron-core leaves in the process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataloaders.clips import truncate, write_clip
from dataloaders.manifest import build_manifest
from tests.distributed import ATTENTION_BACKEND_VARIABLES


def _restoring_attention_backend_variables():
    """megatron-core's GPTModel writes its attention backend into the process's NVTE_* variables
    and refuses a process where they name another: a test or a module's fixture that builds one in
    pytest's process must not hand them to a later test's subprocesses."""
    saved = {name: os.environ.get(name) for name in ATTENTION_BACKEND_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


module_attention_backend = pytest.fixture(scope="module", autouse=True)(
    _restoring_attention_backend_variables)
attention_backend_per_test = pytest.fixture(autouse=True)(_restoring_attention_backend_variables)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Named clips: every frame shows its index (dataloaders.clips.read_index)."""
    d = tmp_path_factory.mktemp("videos")
    clips = {
        "h264": write_clip(d / "h264", "h264", frames=40, width=142, height=78),
        "vp9_odd": write_clip(d / "vp9_odd", "vp9", frames=40, width=97, height=55),
        "vp9": write_clip(d / "vp9", "vp9", frames=48, width=160, height=96),
        "vp9_short": write_clip(d / "vp9_short", "vp9", frames=5, width=64, height=48),
        "h264_vfr": write_clip(d / "h264_vfr", "h264", frames=30, width=96, height=64, vfr=True),
        "vp9_vfr": write_clip(d / "vp9_vfr", "vp9", frames=30, width=96, height=64, vfr=True),
        "mjpeg": write_clip(d / "mjpeg", "mjpeg", frames=12, width=64, height=48),
        "h264_audio": write_clip(d / "h264_audio", "h264", frames=20, audio=True),
        "vp9_audio": write_clip(d / "vp9_audio", "vp9", frames=20, audio=True),
    }
    clips["truncated"] = truncate(write_clip(d / "truncated", "vp9", frames=40), 0.3)
    clips["empty"] = d / "empty.mp4"
    clips["empty"].write_bytes(b"")
    return clips


@pytest.fixture(scope="session")
def stale_manifest(tmp_path_factory) -> Path:
    """A manifest of eight good clips and two that broke after they were probed (a truncated and
    an emptied file): what training meets when files change under a manifest."""
    d = tmp_path_factory.mktemp("train_videos")
    for i in range(8):
        write_clip(d / f"clip{i}", "vp9" if i % 2 else "h264", frames=20 + 3 * i,
                   width=80 + 8 * i, height=64, vfr=i == 3)
    write_clip(d / "broken_truncated", "vp9", frames=40)
    write_clip(d / "broken_empty", "h264", frames=10)
    manifest = d / "manifest.jsonl"
    build_manifest(d, manifest, workers=1, progress=False)
    truncate(d / "broken_truncated.webm", 0.3)
    (d / "broken_empty.mp4").write_bytes(b"")
    return manifest
