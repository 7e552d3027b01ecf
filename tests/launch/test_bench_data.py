"""``python -m launch.bench_data --manifest``: a file that fails to decode is skipped and counted,
as training skips it, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dataloaders.clips import truncate, write_clip
from dataloaders.manifest import build_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_a_broken_file_is_skipped_and_counted(tmp_path):
    for i in range(2):
        write_clip(tmp_path / f"good{i}", "vp9", frames=24, width=64, height=48)
    write_clip(tmp_path / "broken", "vp9", frames=40, width=64, height=48)
    manifest = tmp_path / "manifest.jsonl"
    assert build_manifest(tmp_path, manifest, workers=1, progress=False).kept == 3
    truncate(tmp_path / "broken.webm", 0.2)  # broken after it was probed
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "launch.bench_data", "--manifest", str(manifest),
                           "--samples", "6", "--frames", "8", "--size", "32", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pyav = next(r for r in json.loads(out.read_text())["results"] if r["backend"] == "pyav+torch")
    assert (pyav["clips"], pyav["failed"]) == (4, 2)  # 6 samples over 3 files, round robin
    assert "failed" in proc.stdout
