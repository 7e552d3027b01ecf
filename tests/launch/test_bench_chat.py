"""launch.bench_chat runs a layout's chat with and without the KV cache and writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_chat_writes_a_row_per_mode(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "launch.bench_chat", "configs/stage3_tiny.yaml",
                          "parallel.tp=1", "parallel.pp=1", "parallel.sp=false",
                          "parallel.encoder_tp=0", "--prompt-tokens", "24", "--new-tokens", "6",
                          "--repeats", "1", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["cache"] for r in rows] == [True, False]
    assert all(r["new_tokens"] == 6 and 12 < r["prompt_tokens"] <= 24 and r["tokens_per_s"] > 0
               for r in rows)
    assert "KV cache" in run.stdout
