"""``python -m launch.bench_gpu`` on the CPU with the tiny config: every case measured, its
TFLOP/s the analytic model FLOPs over the measured time, no calibration without a peak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megavideo.accounting.flops import vit_layer_flops
from megavideo.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "stage1_tiny.yaml"


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "launch.bench_gpu", str(TINY), "--layers", "2",
                           "--steps", "2", "--warmup", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "bench_gpu.json").read_text()), out


def test_every_case_is_measured_with_its_shapes(benched):
    text, report, _ = benched
    cases = [(c["name"], c["precision"], c["tokens"], c["length"], c["batch"], c["attention"])
             for c in report["cases"]]
    fp8 = [("student fwd+bwd", "fp8", 17, 32, 2, "sdpa")] if not report["fp8_not_measured"] else []
    # the student on CLS + 4 frames x 4 visible patches (padded to 32 for FP8), the CLIP teacher on
    # each of the 4 frames of the 2 clips (CLS + 16 patches), the MAE teacher on 4 x 16 patches
    assert cases == [("student fwd+bwd", "bf16", 17, 17, 2, "sdpa"), *fp8,
                     ("CLIP teacher fwd", "bf16", 17, 17, 8, "sdpa"),
                     ("MAE teacher fwd", "bf16", 64, 64, 2, "sdpa")]
    assert "student fwd+bwd" in text and "this CPU" in text


def test_tflops_are_the_model_flops_over_the_time(benched):
    _, report, _ = benched
    model = load_config(TINY).model
    parts = {"student fwd+bwd": (model.student, True), "CLIP teacher fwd": (model.clip_teacher, False),
             "MAE teacher fwd": (model.mae_teacher, False)}
    for case in report["cases"]:
        vit, trained = parts[case["name"]]
        forward, backward = vit_layer_flops(vit, case["tokens"], trained)
        flops = case["layers"] * case["batch"] * (forward + backward)
        assert case["tflops"] * case["seconds"] * 1e12 == pytest.approx(flops, rel=1e-12)
        assert case["mfu"] is None and case["peak_gib"] is None  # the CPU has no peak


def test_no_calibration_without_a_peak(benched):
    *_, out = benched
    assert not (out / "calibration.json").exists()


def test_the_calibration_takes_the_elementwise_work_out_of_the_students_time():
    """matmul efficiency = MFU x t / (t - element-wise seconds), the element-wise bytes at the
    planner's HBM efficiency on the device's bandwidth."""
    from megavideo.accounting.bench import Case, calibration
    from megavideo.accounting.devices import DEVICES
    from megavideo.accounting.elementwise import BlockShape, vit_layer_elementwise_bytes
    from megavideo.accounting.planner import Calibration

    cfg = load_config(ROOT / "configs" / "stage1_vit6b.yaml", ["train.fusions=[]"])  # unfused
    vit = cfg.model.student
    case = Case("student fwd+bwd", "bf16", 417, 417, 8, 4, 0.1, 400.0, 0.4, "sdpa", "", 10.0)
    fitted = calibration(cfg, [case], DEVICES["h200"])
    elementwise = 4 * vit_layer_elementwise_bytes(BlockShape(3200, 25, 12800, 417, 8),
                                                  attention="sdpa", drop_path=False)
    seconds = elementwise / (4800e9 * Calibration().hbm_efficiency)
    assert fitted.matmul_efficiency == round(0.4 * 0.1 / (0.1 - seconds), 4)
    assert fitted.source == "launch.bench_gpu on H200 SXM"
    assert vit.qk_norm and vit.layer_scale_init  # the block the bytes are counted for
