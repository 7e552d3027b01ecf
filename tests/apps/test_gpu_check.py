"""``python -m launch.gpu_check``: SKIPs cleanly without a GPU, and its checks work (on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloaders import dali
from megavideo.apps.gpu_check import CHECKS

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    out = Path(args[args.index("--out") + 1])
    return proc, json.loads((out / "report.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_without_a_gpu_every_gpu_check_skips_with_the_reason(tmp_path):
    proc, report = _gpu_check("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(CHECKS) + 1  # one per check and the count
    by_name = {r["name"]: r for r in report["results"]}
    assert list(by_name) == [c.name for c in CHECKS]
    for check in CHECKS:
        result = by_name[check.name]
        assert result["status"] in ("PASS", "SKIP"), result
        if check.gpu:
            assert result["status"] == "SKIP" and result["detail"].startswith("no CUDA device:")
        assert any(line.split()[:2] == [result["status"], check.name] for line in lines)
    assert by_name["dali"]["status"] == ("SKIP" if dali.missing() else "PASS")
    assert report["counts"]["FAIL"] == 0 and lines[-1].startswith(
        f"{report['counts']['PASS']} passed, 0 failed, {report['counts']['SKIP']} skipped")


def test_the_checks_pass_on_the_cpu(tmp_path):
    """The CPU reference, its checkpoint resumed by another process (weights exactly, the next
    loss), the clips and DALI's decode of them against PyAV's, run as the GPU check runs them."""
    proc, report = _gpu_check("--out", str(tmp_path), "--device", "cpu", "--only",
                              "cpu_checkpoint", "--only", "dali_mixed")
    statuses = {r["name"]: r["status"] for r in report["results"]}
    assert statuses == {"cpu_reference": "PASS", "cpu_checkpoint": "PASS", "clips": "PASS",
                        "dali_mixed": "SKIP" if dali.missing() else "PASS"}, proc.stdout
    assert proc.returncode == 0
    detail = next(r["detail"] for r in report["results"] if r["name"] == "cpu_checkpoint")
    assert "relative difference 0.0e+00" in detail  # the same step on the same device


def test_the_vit6b_slice_is_the_6b_config_at_full_width_on_one_gpu(tmp_path):
    """The one check no CPU can run: its config is valid for one rank and keeps the 6B's widths."""
    from megavideo.apps.gpu_check import SLICE, Context, run_config
    from megavideo.config import load_config, validate_world

    cfg = run_config("stage1_vit6b.yaml", Context(tmp_path, "cuda"), tmp_path / "run", SLICE)
    full = load_config(ROOT / "configs" / "stage1_vit6b.yaml")
    validate_world(cfg, 1)
    assert cfg.train.precision == "bf16" and cfg.train.recompute == full.train.recompute
    assert cfg.run.device == "cuda"
    for name in ("student", "clip_teacher", "mae_teacher"):
        part, whole = getattr(cfg.model, name), getattr(full.model, name)
        assert (part.hidden_size, part.num_heads, part.mlp_hidden_size) == \
            (whole.hidden_size, whole.num_heads, whole.mlp_hidden_size)
        assert part.num_layers == 4
