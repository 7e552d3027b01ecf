"""The analytic FLOP count (megavideo.accounting.flops) against PyTorch's FlopCounterMode.

One rank at tp 1 / pp 1 runs one ``Trainer.forward_backward`` per case under FlopCounterMode
(the stage-1 teachers' pass included: it runs inside the step); the synthetic inputs' FLOPs (the
audio filterbank's mel matmul) are counted apart and left out, and the counter's convolution
backward is corrected for grouped convolutions (see tests/accounting/flops_worker.py). Two
micro-batches of two samples per case, with megatron-core's unfused attention (COMMON).
Measured: every case matches the analytic hardware count exactly, and the tests assert that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megavideo.accounting.flops import step_flops, video_tokens
from megavideo.config import load_config
from tests.accounting import flops_worker
from tests.distributed import spawn

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# megatron-core's unfused attention: FlopCounterMode counts its matmuls, and does not count the
# CPU's fused SDPA kernel (the model FLOPs are the kernel's either way)
COMMON = ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false", "run.tensorboard=false",
          "train.global_batch=2", "train.micro_batch=1", "train.attention=unfused"]
STAGE3 = ["parallel.encoder_tp=0"]
CASES = {
    "stage1": ("stage1_tiny.yaml", []),
    "stage1_full": ("stage1_tiny.yaml", ["train.recompute=full"]),
    "stage1_selective": ("stage1_tiny.yaml", ["train.recompute=selective"]),
    "stage2": ("stage2_tiny.yaml", []),  # the toy BEATs trains (audio.frozen: false)
    "stage2_frozen_audio_selective": ("stage2_tiny.yaml", ["model.audio.frozen=true",
                                                           "train.recompute=selective"]),
    "stage3": ("stage3_tiny.yaml", STAGE3),
    "stage3_lora": ("stage3_tiny.yaml", STAGE3 + ["model.llm.tuning=lora",
                                                  "model.llm.lora_rank=4"]),
    "stage3_frozen_video_full": ("stage3_tiny.yaml", STAGE3 + ["model.video_frozen=true",
                                                               "train.recompute=full"]),
    # every step one medium: images (1-frame clips), text alone (the LLM alone)
    "stage3_images": ("stage3_tiny.yaml", STAGE3 + ["data.image_fraction=1.0"]),
    "stage3_text": ("stage3_tiny.yaml", STAGE3 + ["data.text_fraction=1.0"]),
    "stage3_align": ("stage3_align_tiny.yaml", []),
    "stage3_align_full": ("stage3_align_tiny.yaml", ["model.video_frozen=false",
                                                     "train.recompute=full"]),
}


def _config(name: str):
    file, overrides = CASES[name]
    return load_config(CONFIGS / file, COMMON + overrides)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict[str, int]]:
    out = tmp_path_factory.mktemp("flops") / "measured.pt"
    cases = {name: (str(CONFIGS / file), COMMON + overrides)
             for name, (file, overrides) in CASES.items()}
    spawn(1, flops_worker.measure, cases, str(out))
    return torch.load(out)


@pytest.mark.parametrize("name", list(CASES))
def test_hardware_flops_match_the_flop_counter(measured, name):
    cfg = _config(name)
    if cfg.uses_images:
        analytic = step_flops(cfg.image_steps()).hardware
    else:
        analytic = step_flops(cfg, video=not cfg.uses_text).hardware
    assert analytic == measured[name]["model"], measured[name]


def test_recomputation_is_the_difference_it_makes(measured):
    """The recompute term alone matches what recomputation adds to the measured step."""
    for mode in ("full", "selective"):
        flops = step_flops(_config(f"stage1_{mode}"))
        added = measured[f"stage1_{mode}"]["model"] - measured["stage1"]["model"]
        assert added > 0
        assert sum(flops.recompute.values()) == added
        assert flops.model == step_flops(_config("stage1")).model


def test_frozen_parts_have_no_backward():
    flops = step_flops(_config("stage1"))
    assert flops.backward["clip_teacher"] == flops.backward["mae_teacher"] == 0.0
    assert flops.forward["clip_teacher"] > 0 and flops.forward["mae_teacher"] > 0
    assert step_flops(_config("stage2_frozen_audio_selective")).backward["audio"] == 0.0
    assert step_flops(_config("stage3_frozen_video_full")).backward["video"] == 0.0


def test_padding_is_apart_from_the_model_flops():
    """Layouts change the padding (5 student heads and 3 teacher heads padded to a multiple of
    tp, 17 tokens to a multiple of tp under SP), never the model FLOPs."""
    base = _config("stage1")
    reference = step_flops(base)
    assert reference.padding == 0.0
    paddings = []
    for overrides in (["parallel.tp=2"], ["parallel.tp=2", "parallel.sp=true"],
                      ["parallel.tp=4", "parallel.sp=true"]):
        flops = step_flops(load_config(CONFIGS / "stage1_tiny.yaml", COMMON + overrides))
        assert flops.model == reference.model
        assert flops.hardware == pytest.approx(flops.model + flops.padding)
        paddings.append(flops.padding)
    assert 0 < paddings[0] < paddings[1] < paddings[2]
    assert video_tokens(base) == 17 * 2  # CLS + 4 frames x 4 visible patches, global batch 2


def test_breakdown_is_json_able():
    out = json.loads(json.dumps(step_flops(_config("stage2")).to_dict()))
    assert set(out["forward"]) == {"video", "text", "audio", "heads"}
    assert out["hardware"] == pytest.approx(out["model"]) and out["model"] > 0


@pytest.mark.parametrize(("overrides", "layers_in_fp8", "recompute"), [
    ([], 48, 0), (["train.fp8.bf16_first_layers=1", "train.fp8.bf16_last_layers=2"], 45, 0),
    (["train.recompute=full"], 48, 1)])
def test_fp8_counts_the_student_layers_linears(overrides, layers_in_fp8, recompute):
    """Under train.precision=fp8, what runs as FP8 GEMMs: the student blocks' four linears
    (qkv, proj, fc1, fc2: 2 n (3 d w + w d + 2 d m) forward, twice that backward, the forward
    again under full recomputation), not the bf16 first/last layers, not the frozen teachers
    (without fp8.teachers), not the attention, heads or embeddings."""
    cfg = load_config(CONFIGS / "stage1_vit6b.yaml", ["train.precision=fp8", *overrides])
    s = cfg.model.student
    n, d, w, m = 417, s.hidden_size, s.num_heads * s.head_dim, s.mlp_hidden_size
    forward = 2 * n * (3 * d * w + w * d + 2 * d * m)
    expected = layers_in_fp8 * cfg.train.global_batch * forward * (3 + recompute)
    flops = step_flops(cfg)
    assert set(flops.fp8) == {"student"}
    assert flops.fp8["student"] == pytest.approx(expected, rel=1e-12)
    assert step_flops(load_config(CONFIGS / "stage1_vit6b.yaml", overrides)).fp8 == {}
    with_teachers = step_flops(load_config(CONFIGS / "stage1_vit6b.yaml", [
        "train.precision=fp8", "train.fp8.teachers=true", *overrides]))
    assert set(with_teachers.fp8) == {"student", "clip_teacher", "mae_teacher"}
    assert with_teachers.fp8["clip_teacher"] < with_teachers.forward["clip_teacher"]
