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
    assert own["layout"]["tp"] == 2 and own["layout"]["dp"] == 128
    assert own == data["ranked"][0]  # the shipped config is the planner's fastest
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


def test_elementwise_bytes_count_each_eager_op_and_the_fused_kernels():
    """A block of hidden 4 (2 heads of 2), MLP 8, 3 tokens, one sample, bf16, by hand: each norm
    (28 + 4 B) = 36 bytes per value, q and k the same, each branch tail 9 B + 16 = 34, the fused
    tail and q/k norm 3 B = 6, bias + GELU 2 B over the MLP width; backward twice the forward."""
    from megavideo.accounting.elementwise import BlockShape, vit_layer_elementwise_bytes

    rows = 3 * 4
    forward = 2 * 36 * rows + 2 * 36 * rows + 2 * 34 * rows + 2 * 2 * 3 * 8
    block = BlockShape(4, 2, 8, 3, 1)
    full = BlockShape(4, 2, 8, 3, 1, recompute="full")
    assert vit_layer_elementwise_bytes(block, trained=False) == forward
    assert vit_layer_elementwise_bytes(block) == 3 * forward
    assert vit_layer_elementwise_bytes(full) == 4 * forward
    fused = 2 * 36 * rows + 2 * 6 * rows + 2 * 6 * rows + 2 * 2 * 3 * 8
    assert vit_layer_elementwise_bytes(block, trained=False, fused_residual=True,
                                       fused_qk_norm=True) == fused
    scores = (4 * 2 + 24) * 1 * 2 * 3 * 3  # the unfused attention's [b, heads, s, s]
    assert vit_layer_elementwise_bytes(block, trained=False,
                                       attention="unfused") == forward + scores


def test_the_planner_models_the_speed_levers():
    """Against the same layout: FP8 GEMMs, the fused chains and flash attention each shorten the
    predicted step; unfused attention also costs its score matrix in memory."""
    base = load_config(VIT6B)
    layout = Layout.of(base, 256)
    planner = Planner(base, 256, "h100", 2048)
    reference = planner.predict(layout)

    def step(overrides: list[str]) -> float:
        other = Planner(load_config(VIT6B, overrides), 256, "h100", 2048,
                        inventory=planner.inventory)
        return other.predict(layout)

    fp8 = step(["train.precision=fp8"])
    assert fp8.step_s < reference.step_s and fp8.samples_per_s > reference.samples_per_s
    assert step(["train.precision=fp8", "train.fp8.teachers=true"]).step_s < fp8.step_s
    unfused = step(["train.fusions=[]"])  # measured: 0.432 s of element-wise work against 0.234
    assert unfused.time_s["elementwise"] > 1.5 * reference.time_s["elementwise"]
    # one micro-batch per step on one pipeline stage: the step grows by exactly that difference
    assert unfused.step_s - reference.step_s == pytest.approx(
        unfused.time_s["elementwise"] - reference.time_s["elementwise"], rel=1e-9)
    plain = step(["train.attention=unfused"])
    assert plain.step_s > reference.step_s
    assert plain.memory_gib["activations"] > reference.memory_gib["activations"]


def test_whole_teachers_trade_tp_traffic_for_memory():
    """At tp 4 the teachers' all-reduces (forward only, 2 per layer) cost more than gathering
    the targets of whole-teacher replicas; each GPU then holds a whole copy of them."""
    planner = Planner(load_config(VIT6B), 256, "h100", 2048)
    split = planner.predict(Layout(4, 1, 1, 64, True, 8, "none", True, teacher_tp=0))
    whole = planner.predict(Layout(4, 1, 1, 64, True, 8, "none", True, teacher_tp=1))
    assert split.fits and whole.fits
    assert whole.time_s["teachers_comm"] < split.time_s["teachers_comm"] / 10
    assert whole.step_s < split.step_s
    # the teachers' 25 heads pad to 28 at tp 4: a quarter of the padded teacher, a bit more
    assert 3.5 < whole.memory_gib["frozen"] / split.memory_gib["frozen"] < 4.0
    cfg = load_config(VIT6B)
    first = Layout.of(cfg, 256)
    assert first.teacher_tp == 1 and "parallel.teacher_tp=1" in first.overrides()
