"""launch.profile on 2 CPU ranks: a short sweep writes its report, plots and a calibration that
launch.plan reads.

The planner, calibrated on the sweep, predicts the sweep's own step times within a factor of 2.5
(measured: the tp 1 and tp 2 + SP layouts exactly, as the calibration fits them; pp 2 at 1.7x, the
gloo hand-offs between stages on two shared cores being what the model knows least). The per-layer
activation bytes of the real steps equal the formula's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch import plan
from megavideo.accounting.planner import Calibration
from tests.distributed import torchrun

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = ["parallel.tp=1 parallel.pp=1 parallel.sp=false train.micro_batch=2",
           "parallel.tp=2 parallel.pp=1 parallel.sp=true train.micro_batch=2",
           "parallel.tp=1 parallel.pp=2 parallel.sp=false train.micro_batch=4"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    cmd = [*torchrun(2), "-m", "launch.profile", "configs/stage1_tiny.yaml", "--steps", "2",
           "--out", str(out)]
    for layout in LAYOUTS:
        cmd += ["--layout", layout]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_the_report_holds_every_layout_measured_and_predicted(profiled):
    report = json.loads((profiled / "report.json").read_text())
    rows = report["layouts"]
    assert [" ".join(r["overrides"]) for r in rows] == LAYOUTS
    for row in rows:
        assert 1 / 2.5 <= row["predicted_step_s"] / row["perf/step_s"] <= 2.5, row["overrides"]
        assert row["perf/model_tflops"] > 0 and row["mem/peak_gib"] > 0
        assert {"comm/tp_bytes", "comm/tp_analytic_bytes", "pipeline/bubble",
                "pipeline/bubble_formula"} <= set(row)
        assert row["act/layer_bytes"] == row["act/layer_bytes_formula"]
    # SP at tp 2 halves the residual stream; the attention keeps 3 of the 5 heads (padded to 6)
    assert rows[1]["act/layer_bytes"] < 0.65 * rows[0]["act/layer_bytes"]
    tp2, pp2 = rows[1], rows[2]
    # the blocks' analytic volume is part of what is counted (the teachers, aligners, pool and the
    # teachers' targets move bytes too); tests/accounting/test_comm_volume.py matches the blocks' exactly
    assert tp2["comm/tp_bytes"] > tp2["comm/tp_analytic_bytes"] > 0
    assert pp2["comm/pp_bytes"] > pp2["comm/pp_analytic_bytes"] > 0
    assert pp2["pipeline/bubble_formula"] == pytest.approx(1 / 3)  # 8 / (2 x 4): 2 micro-batches
    assert report["device"]["name"] == "this CPU"


def test_the_plots_are_pngs(profiled):
    for name in ("throughput", "memory", "predicted"):
        assert (profiled / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_the_calibration_feeds_the_planner(profiled, tmp_path, capsys):
    calibration = Calibration.load(profiled / "calibration.json")
    assert 0 < calibration.matmul_efficiency and calibration.source.startswith("launch.profile")
    plan.main(["configs/stage1_vit1b.yaml", "profile.device=a100", "--gpus", "64",
               "--calibration", str(profiled / "calibration.json"), "--top", "3"])
    printed = capsys.readouterr().out
    assert "calibration: launch.profile" in printed and "MFU" in printed
