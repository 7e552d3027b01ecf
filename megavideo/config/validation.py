"""The rules between config keys, checked before any process group: each broken rule is a
:class:`~megavideo.config.schema.ConfigError` in one sentence.

One module over the usual 400 lines: the rules of every section in the order they are checked,
many of them across sections (a layout against a model's shape), so that one file says what a
valid config is."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from packaging.version import Version

from megavideo.accounting.devices import DEVICES
from megavideo.config.fp8_rules import check_recipe, validate_fp8
from megavideo.config.schema import (
    ATTENTION_KERNELS,
    FUSIONS,
    LR_SCHEDULES,
    MODEL_SECTIONS,
    OPTIMIZERS,
    STAGE2_TERMS,
    VOCAB_MULTIPLE,
    WSD_DECAY_STYLES,
    Config,
    ConfigError,
    DataConfig,
    EncoderConfig,
    ParallelConfig,
    Stage1ModelConfig,
    Stage2ModelConfig,
    TrainConfig,
    ViTConfig,
)
from parallel.distributed import gpus_expected


def _validate_vit(vit: ViTConfig, name: str, tp: int, tp_key: str = "parallel.tp") -> None:
    if vit.hidden_size % vit.num_heads:
        raise ConfigError(
            f"model.{name}.hidden_size ({vit.hidden_size}) must be divisible by "
            f"model.{name}.num_heads ({vit.num_heads})."
        )
    if vit.mlp_hidden_size % tp:
        raise ConfigError(
            f"model.{name}.mlp_hidden_size ({vit.mlp_hidden_size}) must be divisible by "
            f"{tp_key} ({tp})."
        )
    if vit.image_size % vit.patch_size:
        raise ConfigError(
            f"model.{name}.image_size ({vit.image_size}) must be divisible by "
            f"model.{name}.patch_size ({vit.patch_size})."
        )
    if vit.num_frames % vit.tubelet_size:
        raise ConfigError(
            f"model.{name}.num_frames ({vit.num_frames}) must be divisible by "
            f"model.{name}.tubelet_size ({vit.tubelet_size})."
        )
    if vit.norm not in ("rmsnorm", "layernorm"):
        raise ConfigError(f"model.{name}.norm must be rmsnorm or layernorm, got '{vit.norm}'.")
    if vit.activation not in ("gelu", "gelu_tanh"):
        raise ConfigError(
            f"model.{name}.activation must be gelu or gelu_tanh, got '{vit.activation}'."
        )
    if vit.pool_heads and (vit.hidden_size % vit.pool_heads or vit.pool_heads % tp):
        raise ConfigError(
            f"model.{name}.pool_heads ({vit.pool_heads}) must divide hidden_size "
            f"({vit.hidden_size}) and be divisible by {tp_key} ({tp})."
        )


def _validate_stage1(model: Stage1ModelConfig, par: ParallelConfig, micro_batch: int) -> None:
    student, tp = model.student, par.teacher_tp_size
    tp_key = "parallel.teacher_tp" if par.teacher_tp else "parallel.tp"
    if par.teacher_tp < 0 or par.tp % tp or micro_batch % (par.tp // tp):
        raise ConfigError(f"parallel.teacher_tp ({par.teacher_tp}) must be 0 (parallel.tp) or "
                          f"divide parallel.tp ({par.tp}), and train.micro_batch ({micro_batch}) "
                          "be a multiple of parallel.tp / parallel.teacher_tp: each teacher copy "
                          "takes its share of the clips.")
    for name in ("clip_teacher", "mae_teacher"):
        _validate_vit(getattr(model, name), name, tp, tp_key)
    if not model.clip_teacher.pool_heads or not model.clip_teacher.per_frame:
        raise ConfigError(
            "model.clip_teacher must be a per-frame image model with an attention pool "
            "(per_frame: true, pool_heads > 0)."
        )
    if model.clip_teacher.pool_dim != student.pool_dim:
        raise ConfigError(
            f"model.student.pool_dim ({student.pool_dim}) must equal the CLIP teacher's "
            f"pool_dim ({model.clip_teacher.pool_dim})."
        )
    for name, width in (("clip_teacher", model.clip_teacher.hidden_size),
                        ("mae_teacher", model.mae_teacher.hidden_size)):
        if width % tp:
            raise ConfigError(
                f"model.{name}.hidden_size ({width}) must be divisible by {tp_key} ({tp})."
            )
    frames = student.num_frames * model.mae_teacher.tubelet_size
    if model.mae_teacher.num_frames != frames or model.clip_teacher.num_frames != student.num_frames:
        raise ConfigError(
            f"frame counts disagree: the student sees {student.num_frames} frames, the CLIP teacher "
            f"must see the same and the MAE teacher (tubelet {model.mae_teacher.tubelet_size}) "
            f"{frames}."
        )
    grids = {(v.image_size, v.patch_size) for v in (student, model.clip_teacher, model.mae_teacher)}
    if len(grids) != 1:
        raise ConfigError("the student and both teachers must share image_size and patch_size.")
    if not 1 <= model.clip_layers <= min(student.num_layers, model.clip_teacher.num_layers):
        raise ConfigError(
            f"model.clip_layers ({model.clip_layers}) must be between 1 and the layer count of "
            "the student and of the CLIP teacher."
        )
    if not 1 <= model.mae_layers <= min(student.num_layers, model.mae_teacher.num_layers):
        raise ConfigError(
            f"model.mae_layers ({model.mae_layers}) must be between 1 and the layer count of "
            "the student and of the MAE teacher."
        )
    if len(model.loss_weights) != 3:
        raise ConfigError("model.loss_weights must list 3 weights: clip, final, mae.")


def _validate_encoder(enc: EncoderConfig, name: str, tp: int,
                      tp_key: str = "parallel.tp") -> None:
    if enc.hidden_size % enc.num_heads or enc.num_heads % tp:
        raise ConfigError(
            f"model.{name}.num_heads ({enc.num_heads}) must divide hidden_size "
            f"({enc.hidden_size}) and be divisible by {tp_key} ({tp})."
        )
    if enc.mlp_hidden_size % tp:
        raise ConfigError(f"model.{name}.mlp_hidden_size ({enc.mlp_hidden_size}) must be divisible "
                          f"by {tp_key} ({tp}).")
    if enc.norm not in ("rmsnorm", "layernorm") or enc.activation not in ("gelu", "gelu_tanh"):
        raise ConfigError(f"model.{name}: norm must be rmsnorm or layernorm and activation gelu or "
                          "gelu_tanh.")


def _validate_stage2(model: Stage2ModelConfig, tp: int) -> None:
    text, audio, obj = model.text, model.audio, model.objectives
    _validate_encoder(text, "text", tp)
    if not 1 <= text.fusion_layers <= text.num_layers:
        raise ConfigError(f"model.text.fusion_layers ({text.fusion_layers}) must be between 1 and "
                          f"model.text.num_layers ({text.num_layers}).")
    if not text.vocab_file:
        raise ConfigError("model.text.vocab_file must name BERT's vocab.txt (uncased WordPiece).")
    if not Path(text.vocab_file).is_file():
        raise ConfigError(f"model.text.vocab_file: no such file {text.vocab_file}.")
    for name, section in (("text", text), ("audio", audio)):
        if section.weights and not Path(section.weights).exists():
            raise ConfigError(f"model.{name}.weights: no such file or folder {section.weights}.")
    if not 3 <= text.max_length <= text.max_positions:
        raise ConfigError(f"model.text.max_length ({text.max_length}) must be between 3 and "
                          f"model.text.max_positions ({text.max_positions}).")
    if VOCAB_MULTIPLE % tp:
        raise ConfigError(f"parallel.tp ({tp}) must divide {VOCAB_MULTIPLE}: the text vocabulary "
                          f"is padded to a multiple of {VOCAB_MULTIPLE}.")
    if audio.enabled:
        if not obj.fusion_dim:
            raise ConfigError("model.audio.enabled needs model.objectives.fusion_dim: audio and "
                              "video tokens are projected to one width for the fusion layers.")
        _validate_encoder(audio, "audio", tp)
        if audio.mel_bins % audio.patch_size or audio.frames < audio.patch_size:
            raise ConfigError(f"model.audio: mel_bins ({audio.mel_bins}) must be a multiple of "
                              f"patch_size ({audio.patch_size}) and seconds ({audio.seconds:g}) "
                              "must give at least one patch of frames.")
        if audio.relative_position and not (audio.num_buckets % 2 == 0 and audio.num_buckets >= 8
                                            and audio.max_distance > audio.num_buckets // 4):
            raise ConfigError(f"model.audio: num_buckets ({audio.num_buckets}) must be even and at "
                              f"least 8, and max_distance ({audio.max_distance}) above a quarter "
                              "of it.")
        if audio.hidden_size % audio.pos_conv_groups:
            raise ConfigError(f"model.audio.pos_conv_groups ({audio.pos_conv_groups}) must divide "
                              f"hidden_size ({audio.hidden_size}).")
    if obj.embed_dim % tp or obj.fusion_dim % tp:
        raise ConfigError(f"model.objectives.embed_dim ({obj.embed_dim}) and fusion_dim "
                          f"({obj.fusion_dim}) must be divisible by parallel.tp ({tp}).")
    if obj.temperature <= 0 or not 0 < obj.mlm_probability < 1:
        raise ConfigError("model.objectives.temperature must be positive and mlm_probability in "
                          "(0, 1).")
    weights = [getattr(obj, name) for name in STAGE2_TERMS]
    if min(weights) < 0 or not any(weights[:3]):
        raise ConfigError("model.objectives weights must be >= 0 and one of vtc, vtm, mlm "
                          "positive.")


def _validate_images(config: Config) -> None:
    """Stage 2's image steps: their position table and mask ratio."""
    model = config.model
    if model.image_pos_embed not in ("mean", "own"):
        raise ConfigError(f"model.image_pos_embed must be mean or own, got "
                          f"'{model.image_pos_embed}'.")
    if not 0 <= model.image_mask_ratio < 1:
        raise ConfigError(f"model.image_mask_ratio must be in [0, 1), got {model.image_mask_ratio}.")


def _validate_media(config: Config) -> None:
    """The image data (stages 2 and 3) and stage 3's text-only data, and their shares."""
    data = config.data
    kinds = [("image", data.image_manifest, data.image_fraction)]
    if config.stage == 3:
        kinds.append(("text", data.text_manifest, data.text_fraction))
    elif data.text_manifest or data.text_fraction:
        raise ConfigError("data.text_manifest and data.text_fraction are stage 3's (text-only "
                          "instruction data).")
    for kind, manifest, fraction in kinds:
        if (manifest or fraction) and not config.mixes_media:
            raise ConfigError(f"data.{kind}_manifest and data.{kind}_fraction are read by "
                              f"stage 2 and stage 3's model.substage=instruct only, not "
                              f"{'stage 1' if config.stage == 1 else 'this sub-stage'}.")
        if fraction is not None and not 0 <= fraction <= 1:
            raise ConfigError(f"data.{kind}_fraction must be in [0, 1] or null, got {fraction}.")
        if data.source == "manifest" and fraction and not manifest:
            raise ConfigError(f"data.{kind}_fraction on manifest data needs "
                              f"data.{kind}_manifest (the {kind} data to train on).")
        if manifest and data.source != "manifest":
            raise ConfigError(f"data.{kind}_manifest needs data.source=manifest (synthetic "
                              f"{kind} steps take data.{kind}_fraction alone).")
        if manifest and not Path(manifest).is_file():
            raise ConfigError(f"data.{kind}_manifest: no such file {manifest}.")
    if (data.image_fraction or 0) + (data.text_fraction or 0) > 1:
        raise ConfigError(f"data.image_fraction ({data.image_fraction}) and data.text_fraction "
                          f"({data.text_fraction}) add up to more than 1.")
    if config.uses_images and config.model.student.tubelet_size != 1:
        raise ConfigError(f"image steps need model.student.tubelet_size 1 (an image is one "
                          f"frame), got {config.model.student.tubelet_size}.")


TUNINGS = ("full", "lora", "frozen")


def _validate_stage3(config: Config) -> None:
    par, model, train = config.parallel, config.model, config.train
    qformer, etp = model.qformer, par.encoder_tp_size
    if train.micro_batch % (par.tp // etp):
        raise ConfigError(f"train.micro_batch ({train.micro_batch}) must be a multiple of "
                          f"parallel.tp / parallel.encoder_tp ({par.tp // etp}): each video "
                          "encoder group takes its share of the micro-batch.")
    if model.substage != "align":  # the align sub-stage has no LLM
        _validate_llm(config)
    _validate_encoder(qformer, "qformer", etp,
                      "parallel.encoder_tp" if par.encoder_tp else "parallel.tp")
    if qformer.cross_attention_every < 1 or qformer.num_queries < 1 or qformer.extra_queries < 0:
        raise ConfigError("model.qformer: cross_attention_every and num_queries must be positive, "
                          "extra_queries >= 0.")
    if not 0 <= qformer.dropout < 1:
        raise ConfigError(f"model.qformer.dropout must be in [0, 1), got {qformer.dropout}.")
    if qformer.weights and not Path(qformer.weights).exists():
        raise ConfigError(f"model.qformer.weights: no such file or folder {qformer.weights}.")
    if model.student.num_layers < 2:
        raise ConfigError("stage 3 reads the video encoder's penultimate layer: "
                          "model.student.num_layers must be at least 2.")
    _validate_substage(config)


def _validate_llm(config: Config) -> None:
    par, llm, qformer = config.parallel, config.model.llm, config.model.qformer
    if llm.hidden_size % llm.num_heads or llm.num_heads % llm.num_kv_heads:
        raise ConfigError(f"model.llm.num_heads ({llm.num_heads}) must divide hidden_size "
                          f"({llm.hidden_size}) and be a multiple of num_kv_heads "
                          f"({llm.num_kv_heads}).")
    for name in ("num_kv_heads", "mlp_hidden_size", "vocab_size"):
        if getattr(llm, name) % par.tp:
            raise ConfigError(f"model.llm.{name} ({getattr(llm, name)}) must be divisible by "
                              f"parallel.tp ({par.tp}).")
    if llm.tuning not in TUNINGS:
        raise ConfigError(f"model.llm.tuning must be one of {', '.join(TUNINGS)}, got "
                          f"'{llm.tuning}'.")
    if llm.lora_rank < 1 or llm.lora_rank % par.tp:
        raise ConfigError(f"model.llm.lora_rank ({llm.lora_rank}) must be positive and divisible "
                          f"by parallel.tp ({par.tp}).")
    if not 0 <= llm.lora_dropout < 1:
        raise ConfigError(f"model.llm.lora_dropout must be in [0, 1), got {llm.lora_dropout}.")
    if not llm.tokenizer or not Path(llm.tokenizer).is_file():
        raise ConfigError(f"model.llm.tokenizer must name a tokenizer.json file, got "
                          f"'{llm.tokenizer}'.")
    if llm.weights and not Path(llm.weights).exists():
        raise ConfigError(f"model.llm.weights: no such file or folder {llm.weights}.")
    if not qformer.queries + 8 <= llm.max_length <= llm.max_positions:
        raise ConfigError(f"model.llm.max_length ({llm.max_length}) must leave room for the "
                          f"{qformer.queries} video queries and a question and stay within "
                          f"max_positions ({llm.max_positions}).")
    if par.sp and llm.max_length % par.tp:
        raise ConfigError(f"model.llm.max_length ({llm.max_length}) must be divisible by "
                          f"parallel.tp ({par.tp}) with sequence parallelism.")


SUBSTAGES = ("align", "caption", "instruct")


def _validate_substage(config: Config) -> None:
    """VideoChat2's sub-stages and the QFormer's text."""
    par, model, data = config.parallel, config.model, config.data
    if model.weights and not Path(model.weights).exists():
        raise ConfigError(f"model.weights: no such file or folder {model.weights}.")
    qformer, align = model.qformer, model.align
    if model.substage not in SUBSTAGES:
        raise ConfigError(f"model.substage must be one of {', '.join(SUBSTAGES)}, got "
                          f"'{model.substage}'.")
    texts = model.substage == "align" or qformer.text_input
    if qformer.text_input and model.substage != "instruct":
        raise ConfigError("model.qformer.text_input (the instruction read by the QFormer) needs "
                          "model.substage=instruct: the other sub-stages have no instruction.")
    if texts and not (qformer.vocab_file and Path(qformer.vocab_file).is_file()):
        raise ConfigError(f"model.qformer.vocab_file must name BERT's vocab.txt for the "
                          f"QFormer's text, got '{qformer.vocab_file}'.")
    if qformer.vocab_file and not texts:
        raise ConfigError("model.qformer.vocab_file is read by the align sub-stage and by "
                          "model.qformer.text_input only: unset it or set one of them.")
    if not 3 <= qformer.max_text_length <= qformer.max_positions:
        raise ConfigError(f"model.qformer.max_text_length ({qformer.max_text_length}) must be "
                          f"in [3, max_positions ({qformer.max_positions})].")
    if not 0 <= qformer.drop_path < 1:
        raise ConfigError(f"model.qformer.drop_path must be in [0, 1), got {qformer.drop_path}.")
    if model.substage == "caption":
        from dataloaders.conversation import read_caption_prompts

        try:
            read_caption_prompts(data.caption_prompts)
        except ValueError as err:
            raise ConfigError(f"data.caption_prompts: {err}") from None
        if data.caption_tokens < 1:
            raise ConfigError(f"data.caption_tokens must be positive, got {data.caption_tokens}.")
    if model.substage == "align":
        if par.pp != 1 or par.vpp != 1 or par.encoder_tp_size != par.tp:
            raise ConfigError("model.substage=align has no LLM to pipeline: set parallel.pp=1 "
                              "(the video encoder and QFormer are tensor-parallel over "
                              "parallel.tp; leave parallel.encoder_tp unset).")
        if align.similarity not in ("mean", "max"):
            raise ConfigError(f"model.align.similarity must be mean or max, got "
                              f"'{align.similarity}'.")
        if not 0 <= align.label_smoothing < 1:
            raise ConfigError(f"model.align.label_smoothing must be in [0, 1), got "
                              f"{align.label_smoothing}.")
        if not any((align.vtc, align.vtm, align.cap)):
            raise ConfigError("model.align: at least one of vtc, vtm and cap must be non-zero.")


def validate(config: Config, world_size: int | None = None) -> None:
    """Raise ConfigError for the first rule the config breaks; world_size is checked when given."""
    par, model, train = config.parallel, config.model, config.train
    for name in ("tp", "pp", "vpp"):
        if getattr(par, name) < 1:
            raise ConfigError(f"parallel.{name} must be at least 1, got {getattr(par, name)}.")
    if par.vpp > 1 and par.pp < 2:
        raise ConfigError("parallel.vpp > 1 (interleaved pipeline) needs parallel.pp >= 2.")
    if par.sp and par.tp < 2:
        raise ConfigError("parallel.sp (sequence parallelism) needs parallel.tp >= 2.")
    student = model.student
    if config.stage not in MODEL_SECTIONS:
        raise ConfigError(f"stage must be 1, 2 or 3, got {config.stage}.")
    section = MODEL_SECTIONS[config.stage]
    if type(model) is not section:
        raise ConfigError(f"stage {config.stage}'s model section is a {section.__name__}, got a "
                          f"{type(model).__name__}.")
    # stages 1 and 2 pipeline the video encoder, stage 3 the LLM decoder
    piped, layers = ("LLM", model.llm.num_layers) if config.stage == 3 else \
        ("student", student.num_layers)
    chunks = par.pp * par.vpp
    if chunks > layers:
        raise ConfigError(
            f"{chunks} pipeline stages (pp={par.pp} x vpp={par.vpp}) exceed the {piped}'s "
            f"{layers} layers."
        )
    if par.pipeline_layout:
        if len(par.pipeline_layout) != chunks or min(par.pipeline_layout) < 1:
            raise ConfigError(
                f"parallel.pipeline_layout must list {chunks} positive layer counts "
                f"(one per virtual stage), got {par.pipeline_layout}."
            )
        if sum(par.pipeline_layout) != layers:
            raise ConfigError(
                f"parallel.pipeline_layout sums to {sum(par.pipeline_layout)} layers but the "
                f"{piped} has {layers}."
            )
    if par.encoder_tp < 0 or (par.encoder_tp and config.stage != 3):
        raise ConfigError("parallel.encoder_tp is a stage-3 setting (the video encoder's own "
                          "TP degree), >= 0.")
    student_tp = par.encoder_tp_size
    if par.tp % student_tp:
        raise ConfigError(f"parallel.encoder_tp ({student_tp}) must divide parallel.tp ({par.tp}).")
    student_key = "parallel.encoder_tp" if par.encoder_tp else "parallel.tp"
    _validate_vit(student, "student", student_tp, student_key)
    if not student.pool_heads:
        raise ConfigError("model.student.pool_heads must be set: every stage needs the attention "
                          "pool.")
    if student.hidden_size % student_tp:
        raise ConfigError(
            f"model.student.hidden_size ({student.hidden_size}) must be divisible by "
            f"the video encoder's tp ({student_tp})."
        )
    if config.stage != 3 and not 0.0 <= model.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in [0, 1), got {model.mask_ratio}.")
    if par.teacher_tp and config.stage != 1:
        raise ConfigError("parallel.teacher_tp is a stage-1 setting (the frozen teachers' own TP "
                          "degree).")
    if config.stage == 1:
        _validate_stage1(model, par, train.micro_batch)
    elif config.stage == 2:
        _validate_stage2(model, par.tp)
        _validate_images(config)
    else:
        _validate_stage3(config)
    _validate_media(config)
    if train.precision not in ("fp32", "bf16", "fp8"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp8, got '{train.precision}'.")
    validate_fp8(config)
    if train.recompute not in ("none", "selective", "full"):
        raise ConfigError(
            f"train.recompute must be none, selective or full, got '{train.recompute}'."
        )
    if len(train.betas) != 2:
        raise ConfigError("train.betas must list two numbers.")
    _validate_schedule(train)
    if train.attention not in ATTENTION_KERNELS:
        raise ConfigError(f"train.attention must be one of {', '.join(ATTENTION_KERNELS)}, got "
                          f"'{train.attention}'.")
    unknown = [name for name in train.fusions if name not in FUSIONS and name != "auto"]
    if unknown:
        raise ConfigError(f"train.fusions: unknown fused kernel(s) {', '.join(unknown)} (known: "
                          f"auto, {', '.join(FUSIONS)}).")
    if par.overlap_param_gather and not (par.distributed_optimizer and par.overlap_grad_reduce
                                         is not False):
        raise ConfigError("parallel.overlap_param_gather needs parallel.distributed_optimizer and "
                          "parallel.overlap_grad_reduce.")
    if par.tp_comm_overlap and config.uses_images:
        raise ConfigError("parallel.tp_comm_overlap sizes Transformer Engine's userbuffers for one "
                          "sequence, and image steps have another: set it to null (off with "
                          "image-text data).")
    if par.tp_comm_overlap and not (par.tp > 1 and par.sp and config.stage in (1, 2)):
        raise ConfigError("parallel.tp_comm_overlap overlaps the video encoder's sequence-"
                          "parallel communication in stages 1 and 2: it needs parallel.tp >= 2 "
                          "and parallel.sp.")
    if config.run.timeout_minutes < 1:
        raise ConfigError(f"run.timeout_minutes must be at least 1, got "
                          f"{config.run.timeout_minutes}.")
    if train.micro_batch < 1 or train.global_batch < 1 or train.steps < 0:
        raise ConfigError("train.micro_batch and train.global_batch must be positive.")
    if train.steps and train.warmup_steps >= train.steps:
        raise ConfigError(
            f"train.warmup_steps ({train.warmup_steps}) must be smaller than train.steps "
            f"({train.steps})."
        )
    if config.profile.device not in ("auto", *DEVICES) or config.profile.peak_tflops < 0:
        raise ConfigError(f"profile.device must be auto or one of {', '.join(DEVICES)} and "
                          f"profile.peak_tflops >= 0, got '{config.profile.device}' and "
                          f"{config.profile.peak_tflops}.")
    if config.run.device not in DEVICE_CHOICES:
        raise ConfigError(f"run.device must be one of {', '.join(DEVICE_CHOICES)}, got "
                          f"'{config.run.device}'.")
    if config.checkpoint.interval < 0 or config.checkpoint.keep < 1:
        raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep >= 1.")
    if config.checkpoint.every_minutes < 0:
        raise ConfigError(f"checkpoint.every_minutes must be >= 0 (0: off), got "
                          f"{config.checkpoint.every_minutes}.")
    _validate_data(config.data)
    if world_size is not None:
        validate_world(config, world_size)


def _validate_schedule(train: TrainConfig) -> None:
    if train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                          f"'{train.optimizer}'.")
    if train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                          f"'{train.lr_schedule}'.")
    decay = train.lr_decay_steps or train.steps
    if train.lr_decay_steps < 0 or (train.lr_decay_steps and train.lr_decay_steps <= train.warmup_steps):
        raise ConfigError(f"train.lr_decay_steps ({train.lr_decay_steps}) must be 0 (train.steps) "
                          f"or more than train.warmup_steps ({train.warmup_steps}).")
    if train.lr_schedule == "WSD":
        if not 0 < train.wsd_decay_steps <= decay - train.warmup_steps:
            raise ConfigError(f"train.lr_schedule=WSD anneals over train.wsd_decay_steps, which must "
                              f"be in [1, {decay - train.warmup_steps}] (the decay steps after the "
                              f"warm-up), got {train.wsd_decay_steps}.")
        if train.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(f"train.wsd_decay_style must be one of {', '.join(WSD_DECAY_STYLES)}, "
                              f"got '{train.wsd_decay_style}'.")


DEVICE_CHOICES = ("auto", "cuda", "cpu")
DATA_CHOICES = {
    "source": ("synthetic", "manifest"),
    "backend": ("auto", "pyav", "dali"),
    "normalize": ("imagenet", "clip"),
    "frame_sampling": ("random", "middle"),
    "crop": ("random_resized", "center"),
}


def _validate_data(data: DataConfig) -> None:
    for name, choices in DATA_CHOICES.items():
        if getattr(data, name) not in choices:
            raise ConfigError(f"data.{name} must be one of {', '.join(choices)}, got "
                              f"'{getattr(data, name)}'.")
    if data.source == "manifest":
        if not data.manifest:
            raise ConfigError("data.source=manifest needs data.manifest (make one with "
                              "python -m launch.manifest VIDEO_DIR_OR_CSV -o manifest.jsonl).")
        if not Path(data.manifest).is_file():
            raise ConfigError(f"data.manifest: no such file {data.manifest}.")
    low, high = (data.crop_scale + [0, 0])[:2]
    if len(data.crop_scale) != 2 or not 0 < low <= high <= 1:
        raise ConfigError(f"data.crop_scale must be two numbers 0 < low <= high <= 1, got "
                          f"{data.crop_scale}.")
    if (data.workers is not None and data.workers < 0) or data.prefetch < 1 \
            or data.decode_threads < 1:
        raise ConfigError("data.workers must be >= 0 (or null), data.prefetch and "
                          "data.decode_threads >= 1.")
    if not data.captions:
        raise ConfigError("data.captions must name at least one caption key.")
    if not 0 <= data.max_skip_rate <= 1:
        raise ConfigError(f"data.max_skip_rate must be in [0, 1], got {data.max_skip_rate}.")
    if data.skip_window < 1:
        raise ConfigError(f"data.skip_window must be at least 1 attempt, got {data.skip_window}.")


def validate_start(config: Config) -> None:
    """What starting a training run needs beyond a valid config: a frozen audio encoder is
    loaded from somewhere (its BEATs weights, a checkpoint to load or to resume)."""
    audio = getattr(config.model, "audio", None)
    if audio is None or not (audio.enabled and audio.frozen) or audio.weights:
        return
    if not config.checkpoint.load and not (config.checkpoint_dir / "latest").is_file():
        raise ConfigError(FROZEN_AUDIO)


FROZEN_AUDIO = ("model.audio.frozen keeps the audio encoder as it starts, and nothing loads it: set "
                "model.audio.weights to a BEATs checkpoint, load a stage-2 checkpoint, or set "
                "model.audio.frozen=false.")


def validate_world(config: Config, world_size: int) -> int:
    """Check the layout against the world size; returns the data-parallel size."""
    par, train = config.parallel, config.train
    if world_size % (par.tp * par.pp):
        raise ConfigError(
            f"tp x pp = {par.tp} x {par.pp} = {par.tp * par.pp} does not divide the world size "
            f"{world_size}."
        )
    dp = world_size // (par.tp * par.pp)
    if train.global_batch % (train.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch ({train.global_batch}) must be a multiple of train.micro_batch "
            f"x data-parallel size ({train.micro_batch} x {dp})."
        )
    micro_batches = train.global_batch // (train.micro_batch * dp)
    if par.vpp > 1:
        validate_interleaving(micro_batches, par.pp, "train.global_batch / (train.micro_batch x "
                              "data-parallel size)")
    return dp


def validate_interleaving(micro_batches: int, pp: int, what: str) -> None:
    """megatron-core's interleaved 1F1B schedule takes the step's micro-batches in groups of pp
    and refuses at start-up a count that is not a multiple of pp (a last group of fewer); say so
    here, before any process group. ``what`` names where the count comes from."""
    if micro_batches % pp:
        raise ConfigError(
            f"the interleaved schedule (parallel.vpp > 1) runs micro-batches in groups of "
            f"parallel.pp ({pp}): the micro-batches per step, {what} = {micro_batches}, must be "
            f"a multiple of {pp}."
        )


def _validate_fusions(config: Config) -> None:
    """Fused kernels named in train.fusions (``auto`` picks only what runs) are CUDA kernels,
    but for the compiled ones (kernels.fused), which torch.compile builds for the CPU too;
    fusing the weight-gradient accumulation needs TE's or apex's (megatron-core refuses it
    otherwise, after the process group) and megatron-core's linears; the masked softmax needs
    Megatron-LM's compiled kernels."""
    from megavideo.config.megatron import COMPILED_FUSIONS

    fusions = [name for name in config.train.fusions if name not in ("auto", *COMPILED_FUSIONS)]
    if not fusions:
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"train.fusions ({', '.join(fusions)}) are CUDA kernels: this node has "
                          "no GPU torch can see; set train.fusions=[auto] to run here.")
    from kernels.backends import importable

    if "masked_softmax" in fusions and not importable("scaled_masked_softmax_cuda"):
        raise ConfigError("train.fusions: masked_softmax runs Megatron-LM's compiled "
                          "scaled_masked_softmax_cuda kernel, which is not importable here.")
    if "gradient_accumulation" in fusions and config.train.precision == "fp8":
        from megavideo.config.megatron import fp8_backend

        if fp8_backend(config.train) == "torchao":
            raise ConfigError("train.fusions: gradient_accumulation fuses megatron-core's weight "
                              "gradient, which torchao's FP8 linears compute themselves.")
    if "gradient_accumulation" in fusions:
        from kernels import backends

        found = backends.detect()
        if not (found.transformer_engine or found.apex):
            raise ConfigError("train.fusions: gradient_accumulation needs transformer-engine or "
                              "apex's fused weight-gradient kernel, and this node has neither.")


def _validate_attention(attention: str) -> None:
    """train.attention=flash runs the flash-attn package (on the TE spec, TE's flash kernel,
    which needs it too): a CUDA kernel that must be importable here."""
    if attention != "flash":
        return
    from kernels import backends

    found = backends.detect()
    if not (found.cuda and found.flash_attn):
        why = "this node has no GPU torch can see" if not found.cuda else \
            f"flash-attn is not importable ({found.reason('flash_attn')})"
        raise ConfigError(f"train.attention=flash runs the flash-attn package's CUDA kernels, and "
                          f"{why}: set train.attention=auto (flash-attn where it runs, else "
                          "PyTorch's SDPA).")


def _validate_fp8_device(config: Config) -> None:
    """train.precision=fp8 on this node: the backend it resolves to is importable, offers the
    recipe, and the GPU has FP8 GEMMs (compute capability 8.9+; mxfp8: 10.0+)."""
    from megavideo.config.megatron import fp8_backend

    backend = fp8_backend(config.train)
    if not backend:
        return
    from kernels import backends

    found = backends.detect()
    check_recipe(backend, config.train.fp8.recipe)
    if backend == "te" and not (found.cuda and found.transformer_engine):
        raise ConfigError("train.fp8.backend=te needs Transformer Engine on a GPU, and this node "
                          f"has {found.summary()}: set train.fp8.backend=auto (torchao on the "
                          "local spec) or train.precision=bf16.")
    if backend == "torchao" and not backends.importable("torchao.float8"):
        raise ConfigError("train.precision=fp8 on the local spec runs torchao's float8 training, "
                          "and torchao is not importable here: pip install torchao, or set "
                          "train.precision=bf16.")
    if torch.cuda.is_available():
        need = (10, 0) if config.train.fp8.recipe == "mxfp8" else (8, 9)
        have = torch.cuda.get_device_capability()
        if have < need:
            raise ConfigError(f"train.fp8.recipe={config.train.fp8.recipe} needs a GPU of compute "
                              f"capability {need[0]}.{need[1]} or newer, and this one is "
                              f"{have[0]}.{have[1]}.")


def _validate_tp_comm_overlap(config: Config) -> None:
    """parallel.tp_comm_overlap=true runs Transformer Engine's userbuffers (1.9+, whose
    bootstrap needs no MPI group) on its layer spec."""
    if not config.parallel.tp_comm_overlap:
        return
    from kernels import backends

    found = backends.detect()
    version = found.version("transformer_engine")
    if backends.layer_backend() != "te" or (version and Version(version) < Version("1.9")):
        raise ConfigError("parallel.tp_comm_overlap runs Transformer Engine 1.9+'s userbuffers "
                          f"on its layer spec, and this node has {found.summary()}: set "
                          "parallel.tp_comm_overlap=null (on where it runs).")


def validate_device(config: Config, env: Mapping[str, str] | None = None) -> None:
    """Check ``run.device`` against this node before any process group: a node where the job
    was given GPUs (or the config asks for them) but torch sees none is an error, not a quiet
    run on the CPU."""
    device = config.run.device
    _validate_fusions(config)
    _validate_tp_comm_overlap(config)
    _validate_attention(config.train.attention)
    _validate_fp8_device(config)
    if torch.cuda.is_available():
        if device == "cpu":
            raise ConfigError("run.device=cpu on a node where torch sees a GPU: hide the GPUs "
                              "(CUDA_VISIBLE_DEVICES=) to run on the CPU.")
        return
    if device == "cpu":
        return
    why = "run.device=cuda asks for a GPU" if device == "cuda" else gpus_expected(env)
    if why:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"{why} but torch.cuda.is_available() is false here (torch "
                          f"{torch.__version__}, {build}): start the job in the cluster's CUDA "
                          "environment or container, or set run.device=cpu to run on the CPU.")

