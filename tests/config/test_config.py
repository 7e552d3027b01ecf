"""The config system: presets, overrides, and one clear sentence for every bad config."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from megavideo.config import (
    ConfigError,
    Stage1ModelConfig,
    Stage2ModelConfig,
    Stage3ModelConfig,
    dump,
    load_config,
    parse_overrides,
    validate,
    validate_start,
    validate_world,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "stage1_tiny.yaml"


def test_presets_load_with_official_shapes():
    six = load_config(ROOT / "configs" / "stage1_vit6b.yaml").model
    assert (six.student.hidden_size, six.student.num_layers, six.student.num_heads) == (3200, 48, 25)
    assert six.student.mlp_hidden_size == 12800 and six.student.drop_path == 0.3
    one = load_config(ROOT / "configs" / "stage1_vit1b.yaml").model
    assert (one.student.hidden_size, one.student.num_layers, one.student.num_heads) == (1408, 40, 16)
    assert one.student.mlp_hidden_size == 6144
    for model in (six, one):
        assert (model.clip_teacher.hidden_size, model.clip_teacher.num_layers) == (3200, 48)
        assert (model.mae_teacher.hidden_size, model.mae_teacher.num_layers) == (1408, 40)
        assert model.mae_teacher.tubelet_size == 2 and model.mae_teacher.num_frames == 16
        assert (model.clip_layers, model.mae_layers, model.mask_ratio) == (6, 4, 0.8)


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["parallel.tp=4", "train.lr=3e-4", "parallel.sp=false",
                             "model.student.num_layers=8", "model.loss_weights=[1, 0.5, 2]"])
    assert cfg.parallel.tp == 4 and cfg.train.lr == 3e-4 and cfg.parallel.sp is False
    assert cfg.model.student.num_layers == 8 and cfg.model.loss_weights == [1.0, 0.5, 2.0]
    assert cfg.model.student.hidden_size == 80  # the rest still comes from the preset
    assert parse_overrides(["a.b.c=1", "a.d=x", "e="]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": ""}
    assert load_config(TINY, ["train.min_lr=${train.lr}"]).train.min_lr == 2e-3  # interpolation


def test_each_stage_has_its_own_model_section():
    """A model preset holds every stage's parts (vit-tiny: the student and both teachers); each
    stage takes the keys of its own section, and the rest of the config is the same."""
    one, two, three = (load_config(ROOT / "configs" / f"stage{s}_tiny.yaml") for s in (1, 2, 3))
    assert [type(c.model) for c in (one, two, three)] == [
        Stage1ModelConfig, Stage2ModelConfig, Stage3ModelConfig]
    assert two.model.student == one.model.student and two.model.mask_ratio == one.model.mask_ratio
    assert three.model.student == replace(one.model.student, num_frames=8, drop_path=0.0)
    assert not hasattr(two.model, "clip_teacher") and not hasattr(three.model, "mask_ratio")
    with pytest.raises(ConfigError, match="stage 1's model section is a Stage1ModelConfig, got a "
                                          "Stage2ModelConfig."):
        validate(replace(two, stage=1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_dumped_config_loads_back_to_itself(tmp_path, stage):
    cfg = load_config(ROOT / "configs" / f"stage{stage}_tiny.yaml", ["train.lr=3e-4"])
    (tmp_path / "run.yaml").write_text(dump(cfg))
    assert load_config(tmp_path / "run.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tpp=2"], "unknown config key 'parallel.tpp' (ParallelConfig has: "
                             "distributed_optimizer, encoder_tp,"),
        (["model.student.depth=3"], "unknown config key 'model.student.depth' (ViTConfig has:"),
        (["model.text.num_layers=2"], "unknown config key 'model.text' (stage 1's model section "
                                      "has: aligner_norm_eps, clip_layers, clip_teacher,"),
        (["stage=2", "model.clip_layers=2"], "unknown config key 'model.clip_layers' (stage 2's "
         "model section has: aligner_norm_eps, audio, image_mask_ratio, image_pos_embed, "
         "mask_ratio, objectives, official_recipe, preset, student, text)."),
        (["stage=4"], "stage must be 1, 2 or 3, got 4."),
        (["parallel.tp=two"], "parallel.tp must be of type int, got 'two'."),
        (["parallel.sp=maybe"], "parallel.sp must be true or false, got 'maybe'."),
        (["train.betas=0.9"], "train.betas must be a list, got 0.9."),
        (["train.betas=[a, 0.9]"], "train.betas[0] must be of type float, got 'a'."),
        (["run.dir=[1]"], "run.dir must be of type str, got [1]."),
        (["parallel.pp=4", "parallel.vpp=2"],
         "8 pipeline stages (pp=4 x vpp=2) exceed the student's 6 layers."),
        (["parallel.pp=7"], "7 pipeline stages (pp=7 x vpp=1) exceed the student's 6 layers."),
        (["parallel.pp=1", "parallel.vpp=2"],
         "parallel.vpp > 1 (interleaved pipeline) needs parallel.pp >= 2."),
        (["parallel.tp=1"], "parallel.sp (sequence parallelism) needs parallel.tp >= 2."),
        (["parallel.pipeline_layout=[2, 2]", "parallel.pp=2"],
         "parallel.pipeline_layout sums to 4 layers but the student has 6."),
        (["parallel.tp=3"], "model.student.mlp_hidden_size (320) must be divisible by parallel.tp (3)."),
        (["train.warmup_steps=40"], "train.warmup_steps (40) must be smaller than train.steps (40)."),
        (["train.precision=fp16"], "train.precision must be fp32, bf16 or fp8, got 'fp16'."),
        (["model.preset=vit-2b"], "unknown model preset 'vit-2b' (no file models/vit-2b.yaml)."),
        (["model.clip_layers=9"], "model.clip_layers (9) must be between 1 and the layer count"),
        (["parallel"], "override 'parallel' is not of the form key=value."),
        (["train.optimizer=lamb"], "train.optimizer must be one of adam, sgd, got 'lamb'."),
        (["train.lr_schedule=step"], "train.lr_schedule must be one of cosine, linear, constant, "
                                     "WSD, inverse-square-root, got 'step'."),
        (["train.lr_schedule=WSD"], "train.lr_schedule=WSD anneals over train.wsd_decay_steps, "
                                    "which must be in [1, 35]"),
        (["train.lr_decay_steps=2"], "train.lr_decay_steps (2) must be 0 (train.steps) or more "
                                     "than train.warmup_steps (5)."),
        (["train.fusions=[softmax]"], "train.fusions: unknown fused kernel(s) softmax (known: "
                                      "auto, bias_activation, bias_dropout, masked_softmax, rope,"),
        (["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather needs "
         "parallel.distributed_optimizer and parallel.overlap_grad_reduce."),
        (["run.timeout_minutes=0"], "run.timeout_minutes must be at least 1, got 0."),
    ],
)
def test_bad_config_fails_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ([], 6, "tp x pp = 2 x 2 = 4 does not divide the world size 6."),
        (["train.global_batch=6"], 8, "train.global_batch (6) must be a multiple of train.micro_batch "
                                      "x data-parallel size (2 x 2)."),
        (["parallel.vpp=2", "train.global_batch=2"], 4,
         "the interleaved schedule (parallel.vpp > 1) runs micro-batches in groups of parallel.pp "
         "(2): the micro-batches per step, train.global_batch / (train.micro_batch x data-parallel "
         "size) = 1, must be a multiple of 2."),
        (["parallel.vpp=2", "train.global_batch=6"], 4,
         "the interleaved schedule (parallel.vpp > 1) runs micro-batches in groups of parallel.pp "
         "(2): the micro-batches per step, train.global_batch / (train.micro_batch x data-parallel "
         "size) = 3, must be a multiple of 2."),
    ],
)
def test_layout_must_fit_the_world(overrides, world, message):
    with pytest.raises(ConfigError, match=None) as err:
        validate_world(load_config(TINY, overrides), world)
    assert str(err.value) == message


def test_train_rejects_a_bad_config_before_any_process_group():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", str(TINY), "parallel.tp=3"],
        cwd=ROOT, capture_output=True, text=True, env={"WORLD_SIZE": "4", "RANK": "0", "PATH": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.student.mlp_hidden_size (320) must be divisible by parallel.tp (3).")
    assert time.perf_counter() - start < 30


def test_train_rejects_a_layout_that_does_not_fit_the_world():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", str(TINY)],
        cwd=ROOT, capture_output=True, text=True, env={"WORLD_SIZE": "6", "RANK": "0", "PATH": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: tp x pp = 2 x 2 = 4 does not divide the world size 6.")


@pytest.mark.parametrize(("name", "gpus", "drop_path"),
                         [("stage1_vit1b", 128, 0.25), ("stage1_vit6b", 256, 0.3)])
def test_the_papers_recipe(name, gpus, drop_path):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    train = cfg.train
    assert (train.betas, train.eps, train.weight_decay, train.clip_grad) == ([0.9, 0.98], 1e-6, 0.05, 3.0)
    assert train.lr == pytest.approx(1.5e-4 * train.global_batch / 256)
    assert train.precision == "bf16"
    assert train.recompute == "none"  # launch.plan's fastest that fits (docs/performance.md)
    assert train.warmup_steps * 301 == pytest.approx(train.steps * 40, rel=1e-3)
    assert cfg.model.student.drop_path == drop_path and cfg.model.student.layer_scale_init == 1e-5
    validate_world(cfg, gpus)  # the layout fits the paper's GPU count
    assert cfg.checkpoint.interval > 0


def test_megatron_cores_configs_are_built_from_the_config_keys():
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megavideo.config import megatron

    cfg = load_config(TINY, ["train.optimizer=sgd", "train.momentum=0.5", "train.lr=0.1",
                               "train.min_lr=0.01", "train.steps=20", "train.warmup_steps=2",
                               "train.lr_schedule=WSD", "train.wsd_decay_steps=4",
                               "train.wsd_decay_style=linear", "parallel.distributed_optimizer=true",
                               "parallel.overlap_grad_reduce=true", "run.timeout_minutes=7"])
    opt = megatron.optimizer_config(cfg, torch.float32)
    assert (opt.optimizer, opt.sgd_momentum, opt.lr, opt.use_distributed_optimizer) == (
        "sgd", 0.5, 0.1, True)
    ddp = megatron.ddp_config(cfg)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.grad_reduce_in_fp32) == (
        True, False, True)
    assert megatron.process_group_timeout(cfg).total_seconds() == 7 * 60
    settings = megatron.transformer_settings(cfg.train)
    assert not any(settings[field] for field in megatron.FUSIONS.values())  # auto, on the CPU

    # the schedule megatron-core runs: warm-up 0 -> 0.1 over 2 steps, the peak until step 16,
    # then a linear anneal to min_lr over the last 4 of the 20 decay steps
    group = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.0, "weight_decay": 0.0}
    sched = megatron.scheduler(cfg, torch.optim.SGD([group], lr=0.0))
    assert isinstance(sched, OptimizerParamScheduler)
    lrs = [sched.get_lr(group) for sched.num_steps in range(21)]
    expected = [0.1 * s / 2 for s in range(2)] + [0.1] * 15 + [
        0.1 - (0.1 - 0.01) * (s - 16) / 4 for s in range(17, 21)]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("overrides", "gpu", "expected"), [
    ([], False, (False, False)),  # the CPU: gloo, nothing to hide
    ([], True, (True, False)),  # a GPU run overlaps the gradient reduce
    (["parallel.distributed_optimizer=true"], True, (True, True)),  # and the parameter gather
    (["parallel.distributed_optimizer=true", "run.device=cpu"], True, (False, False)),
    (["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=false"], True,
     (False, False)),
    (["parallel.distributed_optimizer=true", "parallel.overlap_param_gather=true"], False,
     (True, True)),  # a gather asked for brings the reduce along
])
def test_communication_overlaps_by_default_on_a_gpu(monkeypatch, overrides, gpu, expected):
    import torch

    from megavideo.config import megatron

    cfg = load_config(TINY, overrides)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert megatron.overlap(cfg) == expected
    ddp = megatron.ddp_config(cfg)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather) == expected


@pytest.mark.parametrize(("config", "overrides", "te", "expected"), [
    (TINY, [], True, True),  # TE's spec on GPUs, tp 2 + SP: the userbuffers overlap
    (TINY, [], False, False),  # the local spec: megatron-core's collectives
    (TINY, ["parallel.sp=false"], True, False),
    (TINY, ["run.device=cpu"], True, False),
    (ROOT / "configs" / "stage3_tiny.yaml", [], True, False),  # two SP-split transformers
    (TINY, ["parallel.tp_comm_overlap=false"], True, False),
])
def test_te_tp_communication_overlap_is_on_where_it_runs(monkeypatch, config, overrides, te,
                                                          expected):
    import torch

    from megavideo.config import megatron

    cfg = load_config(config, overrides)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(megatron, "layer_backend", lambda: "te" if te else "local")
    assert megatron.tp_comm_overlap(cfg) == expected


def test_te_tp_communication_overlap_asked_for_is_checked():
    from megavideo.config import validate_device

    with pytest.raises(ConfigError, match="tp_comm_overlap overlaps the video encoder's sequence-"
                                          "parallel communication in stages 1 and 2"):
        load_config(TINY, ["parallel.tp_comm_overlap=true", "parallel.sp=false"])
    cfg = load_config(TINY, ["parallel.tp_comm_overlap=true"])
    from kernels.backends import detect

    if detect().transformer_engine:
        pytest.skip("Transformer Engine is installed: the overlap runs")
    with pytest.raises(ConfigError, match=r"^parallel.tp_comm_overlap runs Transformer Engine "
                                          r"1.9\+'s userbuffers on its layer spec, and this node"):
        validate_device(cfg, env={})


@pytest.mark.parametrize(("fusions", "gpu", "expected"), [
    ("[auto]", False, set()),  # the CPU: today's numbers
    ("[auto]", True, {"bias_activation", "bias_dropout"}),  # + rope, gradient_accumulation with TE
    ("[]", True, set()),
    ("[auto,masked_softmax]", True, {"bias_activation", "bias_dropout", "masked_softmax"}),
])
def test_auto_fusions_are_megatrons_kernels_on_a_gpu(monkeypatch, fusions, gpu, expected):
    from kernels.backends import detect
    from megavideo.config import megatron

    if detect().transformer_engine or detect().apex:
        pytest.skip("TE or apex adds their fusions to auto")
    from kernels.backends import importable

    if gpu and "auto" in fusions and importable("triton"):  # + kernels.fused's compiled chains
        expected = expected | set(megatron.COMPILED_FUSIONS)
    cfg = load_config(TINY, [f"train.fusions={fusions}"] if fusions != "[auto]" else [])
    assert megatron.fusions(cfg.train, gpu=gpu) == expected


def test_a_frozen_audio_encoder_that_nothing_loads_is_refused(tmp_path):
    stage2 = ROOT / "configs" / "stage2_tiny.yaml"
    frozen = ["model.audio.frozen=true", f"run.dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^model\.audio\.frozen keeps the audio encoder as it "
                                          r"starts, and nothing loads it: set model\.audio\.weights"):
        validate_start(load_config(stage2, frozen))
    beats = tmp_path / "beats.pt"
    beats.write_bytes(b"")
    validate_start(load_config(stage2, [*frozen, f"model.audio.weights={beats}"]))
    validate_start(load_config(stage2, frozen[1:]))  # trained: nothing to load


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.image_fraction=0.5", "data.source=manifest", "data.manifest=x.jsonl"],
     "data.image_fraction on manifest data needs data.image_manifest"),
    (["data.image_manifest=images.jsonl"], "data.image_manifest needs data.source=manifest"),
    (["data.image_fraction=1.5"], r"data.image_fraction must be in \[0, 1\] or null, got 1.5."),
    (["model.image_pos_embed=learned"], "model.image_pos_embed must be mean or own"),
    (["model.image_mask_ratio=1.0"], r"model.image_mask_ratio must be in \[0, 1\)"),
])
def test_bad_image_settings_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "stage2_tiny.yaml", overrides)


def test_tp_comm_overlap_is_refused_with_image_steps():
    with pytest.raises(ConfigError, match=r"^parallel\.tp_comm_overlap sizes Transformer Engine's "
                                          r"userbuffers for one sequence, and image steps"):
        load_config(ROOT / "configs" / "stage2_tiny.yaml", ["data.image_fraction=0.5",
                                                            "parallel.tp_comm_overlap=true"])
