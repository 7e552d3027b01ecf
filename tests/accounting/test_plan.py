"""The layout planner (launch.plan): ranked layouts of vit-6b stage 1 on 256 H100s, refusals with
the reason, and the planner's own arithmetic on small cases."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from launch import plan
from megavideo.accounting.pipeline_timing import bubble_fraction
from megavideo.accounting.planner import Calibration, Layout, Planner, pipeline_time
from megavideo.config import ConfigError, load_config

VIT6B = "configs/stage1_vit6b.yaml"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plan.main([VIT6B, "profile.device=h100", "train.global_batch=2048", "--gpus", "256",
                   "--json", str(out), "--refused", "3"])
    return printed.getvalue(), json.loads(out.read_text())


def test_vit6b_stage1_on_256_h100_prints_a_ranked_table(planned):
    text, data = planned
    assert "256 x H100 SXM" in text and "MFU" in text and "GiB/rank" in text
    ranked = data["ranked"]
    assert len(ranked) >= 10
    steps = [p["step_s"] for p in ranked]
    assert steps == sorted(steps)
    best = ranked[0]
    assert 0.05 < best["mfu"] < 0.8  # a plausible prediction, not a unit slip
    assert best["memory_gib"]["total"] <= 80
    assert {"weights", "grads", "optimizer", "frozen", "activations"} <= set(best["memory_gib"])
    for p in ranked:
        lay = p["layout"]
        assert lay["tp"] * lay["pp"] * lay["dp"] == 256
        assert 2048 % (lay["dp"] * lay["micro_batch"]) == 0


def test_layouts_that_do_not_fit_are_refused_with_the_reason(planned):
    text, data = planned
    refused = [p for p in data["refused"] if "GiB" in p["why"]]
    assert refused, "some layout of a 6B model plus two teachers must overflow 80 GiB"
    assert all("needs" in p["why"] and "of the H100 SXM's 80 GiB" in p["why"] for p in refused)
    # no recomputation at tp 1, pp 1: 6B of weights, gradients and Adam plus the teachers
    plain = [p for p in refused if p["layout"]["tp"] == 1 and p["layout"]["pp"] == 1
             and p["layout"]["recompute"] == "none"]
    assert plain
    assert "refused" in text


def test_the_configs_own_layout_gets_a_verdict(planned):
    text, data = planned
    own = data["config_layout"]
    assert own["layout"]["tp"] == 4 and own["layout"]["dp"] == 64
    assert "the config's layout" in text


def test_pipeline_time_of_equal_stages_gives_the_bubble_formula():
    for p, m, v in ((4, 8, 1), (4, 8, 2), (8, 32, 3)):
        step = pipeline_time([1.0] * p, m, v)
        assert 1 - m / step == pytest.approx(bubble_fraction(p, m, v))


def test_the_teachers_on_the_first_stage_unbalance_a_stage1_pipeline():
    """Stage 1's frozen teachers cost more than the student and run on the first pipeline rank:
    splitting the student over 4 ranks leaves the others idle far beyond the fill-and-drain
    bubble, which the planner predicts (and more micro-batches do not cure)."""
    planner = Planner(load_config(VIT6B), 256, "h100", 2048)
    few = planner.predict(Layout(4, 4, 1, 16, True, 32, "full", True))  # 4 micro-batches
    many = planner.predict(Layout(4, 4, 1, 16, True, 4, "full", True))  # 32 micro-batches
    assert few.bubble > many.bubble > bubble_fraction(4, 32) + 0.3
    flat = planner.predict(Layout(4, 1, 1, 64, True, 4, "full", True))
    assert flat.bubble == pytest.approx(0.0, abs=1e-9) and flat.mfu > many.mfu


def test_a_layout_the_config_rules_refuse_says_so():
    cfg = load_config(VIT6B)
    planner = Planner(cfg, 256, "h100", 2048)
    bad = planner.predict(Layout(4, 1, 1, 64, True, 3, "full", True))  # 2048 % (64 * 3) != 0
    assert not bad.fits and "batch" in bad.why


def test_unknown_gpu_and_unreadable_calibration_are_one_sentence(tmp_path):
    cfg = load_config(VIT6B)
    with pytest.raises(ConfigError, match="unknown GPU type 'v100'"):
        Planner(cfg, 256, "v100", 2048)
    with pytest.raises(ConfigError, match="calibration file"):
        Calibration.load(tmp_path / "missing.json")
