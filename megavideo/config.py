"""One config system: dataclasses, YAML files under ``configs/``, dotted ``key=value`` overrides.

A run config is a YAML file with the sections ``model``, ``parallel``, ``train``, ``data`` and ``run``.
``model.preset`` names a model preset (``configs/models/<preset>.yaml``) whose values sit under the
run file's own ``model`` keys, which sit under the command-line overrides. Every error is raised as
:class:`ConfigError` with one sentence, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from megavideo.accounting.devices import DEVICES
from parallel.distributed import gpus_expected

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
VOCAB_MULTIPLE = 128  # the text vocabulary is padded to a multiple of this, whatever the tp
STAGE2_TERMS = ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")


def padded_vocab(size: int) -> int:
    """The text vocabulary's size padded to a multiple of :data:`VOCAB_MULTIPLE`."""
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class ConfigError(ValueError):
    """A bad configuration, explained in one sentence."""


@dataclass
class EncoderConfig:
    """The transformer shape every encoder shares (the video ViTs, the text and audio encoders)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_hidden_size: int = 256
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    qk_norm: bool = True
    qkv_bias: bool = False
    layer_scale_init: float = 0.0  # 0 disables layer scale
    drop_path: float = 0.0
    activation: str = "gelu_tanh"  # gelu_tanh | gelu

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ViTConfig(EncoderConfig):
    """One vision transformer: the student or a teacher."""

    patch_size: int = 14
    tubelet_size: int = 1
    image_size: int = 224
    num_frames: int = 8
    per_frame: bool = False  # image model applied to each frame (the CLIP teacher)
    cls_token: bool = True
    learnable_pos_embed: bool = True
    final_norm: bool = False
    pool_heads: int = 0  # attention-pool head; 0 disables it
    pool_dim: int = 768

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_patches(self) -> int:
        return self.patches_per_frame * (self.num_frames // self.tubelet_size)


@dataclass
class PostNormEncoderConfig(EncoderConfig):
    """BERT's and BEATs' shared defaults: post-norm LayerNorm layers, qkv bias, exact GELU."""

    preset: str = ""  # an encoder file configs/models/<preset>.yaml
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qkv_bias: bool = True
    activation: str = "gelu"


@dataclass
class TextConfig(PostNormEncoderConfig):
    """The stage-2 text encoder: BERT (post-norm), its last ``fusion_layers`` layers cross-attend
    to the video (or audio-video) tokens."""

    num_layers: int = 4
    norm_eps: float = 1e-12
    fusion_layers: int = 2
    vocab_file: str = ""  # BERT's vocab.txt (uncased WordPiece)
    max_length: int = 40  # tokens per caption, [CLS] and [SEP] included
    max_positions: int = 512
    type_vocab_size: int = 2


@dataclass
class AudioConfig(PostNormEncoderConfig):
    """The stage-2 audio encoder: BEATs (post-norm with DeepNorm residual scaling) on 16 kHz
    log-mel filterbanks, 16x16 patches of a [frames, mel_bins] image."""

    enabled: bool = False
    frozen: bool = True
    patch_size: int = 16
    patch_dim: int = 512  # width of the patch convolution, projected to hidden_size
    mel_bins: int = 128
    seconds: float = 10.0  # audio per clip: longer is cut, shorter padded and masked
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    deep_norm: bool = True

    @property
    def frames(self) -> int:
        """Filterbank frames of ``seconds`` of audio (25 ms windows every 10 ms), whole patches."""
        frames = int((self.seconds * 1000 - 25) // 10) + 1
        return frames // self.patch_size * self.patch_size


@dataclass
class LLMConfig:
    """The stage-3 LLM decoder: Mistral-shaped (RMSNorm, SwiGLU, RoPE, grouped-query attention,
    untied output layer)."""

    preset: str = ""  # an encoder file configs/models/<preset>.yaml (its ``llm`` mapping)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_hidden_size: int = 128
    vocab_size: int = 256
    max_positions: int = 2048
    rope_base: float = 1000000.0
    norm_eps: float = 1e-5
    tokenizer: str = ""  # a Hugging Face tokenizer.json (Mistral's, or any with <s> and </s>)
    max_length: int = 256  # tokens per sequence, the video's query tokens included (padded)
    tuning: str = "full"  # full | lora | frozen
    lora_rank: int = 16  # LoRA on the attention projections (linear_qkv, linear_proj)
    lora_alpha: float = 32.0
    weights: str = ""  # Hugging Face safetensors (a file or a folder) imported at start-up


@dataclass
class QFormerConfig(PostNormEncoderConfig):
    """Stage 3's bridge: a BERT-base-shaped QFormer whose learned queries cross-attend to the
    video encoder's penultimate-layer tokens (every ``cross_attention_every``-th layer, from the
    first), projected into the LLM's width."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_hidden_size: int = 3072
    norm_eps: float = 1e-12
    num_queries: int = 32
    extra_queries: int = 64
    cross_attention_every: int = 2
    frozen: bool = False

    @property
    def queries(self) -> int:
        return self.num_queries + self.extra_queries


@dataclass
class ObjectivesConfig:
    """Stage 2's losses and their weights (a weight of 0 skips the term)."""

    embed_dim: int = 768  # contrastive projection width
    fusion_dim: int = 0  # video (and audio) tokens projected to this width for the fusion
    # layers (Linear + LayerNorm, InternVideo2-6B: 768); 0: the video tokens as they are (1B)
    temperature: float = 0.07  # initial value; learnable
    learn_temperature: bool = True
    mlm_probability: float = 0.15
    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0
    avtc: float = 1.0  # the audio-video variants: need model.audio.enabled
    avtm: float = 1.0
    avmlm: float = 1.0


@dataclass
class ModelConfig:
    """The model of the run's stage. Stage 1: the student, the two frozen teachers and the
    aligners between them. Stage 2: the student as video encoder, the text and audio encoders and
    the objectives. Stage 3: the student as video encoder, the QFormer and the LLM decoder."""

    preset: str = ""
    student: ViTConfig = field(default_factory=ViTConfig)
    clip_teacher: ViTConfig = field(default_factory=ViTConfig)
    mae_teacher: ViTConfig = field(default_factory=ViTConfig)
    clip_layers: int = 6  # CLIP aligners on the student's last clip_layers layers
    mae_layers: int = 4  # MAE aligners on the student's last mae_layers layers
    mask_ratio: float = 0.8
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # clip, final, mae
    aligner_norm_eps: float = 1e-5
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    video_frozen: bool = False  # stage 3: freeze the video encoder


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # model chunks per pipeline stage (interleaved 1F1B when > 1)
    sp: bool = False
    distributed_optimizer: bool = False
    pipeline_layout: list[int] = field(default_factory=list)  # layers per virtual stage, optional
    # stage 3: the video encoder and QFormer's TP degree on the LLM's first pipeline stage
    # (0: parallel.tp); it divides parallel.tp, the rest of the TP group splits the clips
    encoder_tp: int = 0

    @property
    def encoder_tp_size(self) -> int:
        return self.encoder_tp or self.tp


@dataclass
class TrainConfig:
    steps: int = 10
    global_batch: int = 8
    micro_batch: int = 1
    lr: float = 1.5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    clip_grad: float = 3.0
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16
    recompute: str = "none"  # none | selective | full


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | manifest
    manifest: str = ""  # a manifest.jsonl from python -m launch.manifest
    backend: str = "auto"  # auto | pyav | dali (auto: DALI's NVDEC on GPU ranks, else PyAV)
    normalize: str = "imagenet"  # imagenet | clip (mean and standard deviation)
    frame_sampling: str = "random"  # random | middle (frame in each segment)
    crop: str = "random_resized"  # random_resized | center
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # area fraction range
    flip: bool = True
    workers: int = 2  # PyAV decode processes, or DALI threads
    prefetch: int = 2  # micro-batches decoded ahead
    decode_threads: int = 1  # FFmpeg threads per PyAV decode
    max_skip_rate: float = 0.05  # stop when more of the decodes fail (after a global batch)
    # stage 2: manifest keys a clip's caption is drawn from, uniformly among every caption the
    # listed keys hold for it (e.g. caption, captions, asr_captions, avs_captions)
    captions: list[str] = field(default_factory=lambda: ["caption"])


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <run.dir>/checkpoints
    interval: int = 0  # save every N steps (0: only at the end and on SIGUSR1/SIGTERM)
    keep: int = 3  # keep the last K checkpoints
    save_at_end: bool = True
    load: str = ""  # start a new run from these weights (a checkpoint directory or its root)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    # auto: the GPUs torch sees (NCCL), else the CPU (gloo), but an error where the job was given
    # GPUs torch cannot see; cuda: refuse to start without them; cpu: the CPU, on a GPU-less node
    device: str = "auto"


@dataclass
class ProfileConfig:
    """Throughput accounting of the training loop (see docs/performance.md)."""

    device: str = "auto"  # the peak table's device (h100, h200, a100) or auto: this GPU
    peak_tflops: float = 0.0  # overrides the table's per-device peak for MFU
    comm: bool = False  # count the bytes of every TP/SP/PP/DP collective each step
    pipeline: bool = False  # time each pipeline stage's busy and idle share of a step


@dataclass
class Config:
    stage: int = 1  # 1: distillation from the teachers; 2: video-audio-text alignment; 3: chat
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level.")
    return data


def parse_overrides(items: list[str]) -> dict:
    """``["parallel.tp=2", "train.steps=5"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value.")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key below a value.")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return tree


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        (inner,) = typing.get_args(hint)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{where} must be of type {hint.__name__}, got {value!r}.")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{where}.{key}' (known: {', '.join(sorted(names))})."
            )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}"
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


def _preset_file(name: str, kind: str, config_dir: Path) -> dict:
    for directory in (config_dir / "models", CONFIG_DIR / "models"):
        path = directory / f"{name}.yaml"
        if path.is_file():
            return _read_yaml(path)
    raise ConfigError(f"unknown {kind} preset '{name}' (no file models/{name}.yaml).")


def _resolve_preset(raw: dict, config_dir: Path) -> dict:
    """``model.preset`` names a whole model file (its ``model`` mapping); ``model.text.preset``,
    ``model.audio.preset`` and ``model.llm.preset`` name a file of that part (its ``text``,
    ``audio`` or ``llm`` mapping). The run's own
    keys sit over the preset's."""
    model = raw.get("model", {})
    if not isinstance(model, dict):
        return raw
    if model.get("preset"):
        preset = _preset_file(model["preset"], "model", config_dir)
        model = _merge(preset.get("model", preset), model)
    for section in ("text", "audio", "llm", "qformer"):
        sub = model.get(section)
        if isinstance(sub, dict) and sub.get("preset"):
            preset = _preset_file(sub["preset"], section, config_dir)
            model = {**model, section: _merge(preset.get(section, preset), sub)}
    return {**raw, "model": model}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config, apply the preset and the overrides, validate the result."""
    raw: dict = {}
    config_dir = CONFIG_DIR
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        config_dir = path.resolve().parent
    raw = _merge(raw, parse_overrides(list(overrides)))
    raw = _resolve_preset(raw, config_dir)
    config = _build(Config, raw, "config")
    validate(config)
    return config


# --------------------------------------------------------------------------------------------
# Validation (everything that can be checked without a process group)


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


def _validate_stage1(model: ModelConfig, tp: int) -> None:
    student = model.student
    for name in ("clip_teacher", "mae_teacher"):
        _validate_vit(getattr(model, name), name, tp)
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
                f"model.{name}.hidden_size ({width}) must be divisible by parallel.tp ({tp})."
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


def _validate_stage2(model: ModelConfig, tp: int) -> None:
    text, audio, obj = model.text, model.audio, model.objectives
    _validate_encoder(text, "text", tp)
    if not 1 <= text.fusion_layers <= text.num_layers:
        raise ConfigError(f"model.text.fusion_layers ({text.fusion_layers}) must be between 1 and "
                          f"model.text.num_layers ({text.num_layers}).")
    if not text.vocab_file:
        raise ConfigError("model.text.vocab_file must name BERT's vocab.txt (uncased WordPiece).")
    if not Path(text.vocab_file).is_file():
        raise ConfigError(f"model.text.vocab_file: no such file {text.vocab_file}.")
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


TUNINGS = ("full", "lora", "frozen")


def _validate_stage3(config: Config) -> None:
    par, model, train = config.parallel, config.model, config.train
    llm, qformer, etp = model.llm, model.qformer, par.encoder_tp_size
    if train.micro_batch % (par.tp // etp):
        raise ConfigError(f"train.micro_batch ({train.micro_batch}) must be a multiple of "
                          f"parallel.tp / parallel.encoder_tp ({par.tp // etp}): each video "
                          "encoder group takes its share of the micro-batch.")
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
    _validate_encoder(qformer, "qformer", etp,
                      "parallel.encoder_tp" if par.encoder_tp else "parallel.tp")
    if qformer.cross_attention_every < 1 or qformer.num_queries < 1 or qformer.extra_queries < 0:
        raise ConfigError("model.qformer: cross_attention_every and num_queries must be positive, "
                          "extra_queries >= 0.")
    if model.student.num_layers < 2:
        raise ConfigError("stage 3 reads the video encoder's penultimate layer: "
                          "model.student.num_layers must be at least 2.")


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
    if config.stage not in (1, 2, 3):
        raise ConfigError(f"stage must be 1, 2 or 3, got {config.stage}.")
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
    if not 0.0 <= model.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in [0, 1), got {model.mask_ratio}.")
    if config.stage == 1:
        _validate_stage1(model, par.tp)
    elif config.stage == 2:
        _validate_stage2(model, par.tp)
    else:
        _validate_stage3(config)
    if train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be fp32 or bf16, got '{train.precision}'.")
    if train.recompute not in ("none", "selective", "full"):
        raise ConfigError(
            f"train.recompute must be none, selective or full, got '{train.recompute}'."
        )
    if len(train.betas) != 2:
        raise ConfigError("train.betas must list two numbers.")
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
    _validate_data(config.data)
    if world_size is not None:
        validate_world(config, world_size)


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
    if data.workers < 0 or data.prefetch < 1 or data.decode_threads < 1:
        raise ConfigError("data.workers must be >= 0, data.prefetch and data.decode_threads >= 1.")
    if not data.captions:
        raise ConfigError("data.captions must name at least one caption key.")
    if not 0 <= data.max_skip_rate <= 1:
        raise ConfigError(f"data.max_skip_rate must be in [0, 1], got {data.max_skip_rate}.")


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


def validate_device(config: Config, env: Mapping[str, str] | None = None) -> None:
    """Check ``run.device`` against this node before any process group: a node where the job
    was given GPUs (or the config asks for them) but torch sees none is an error, not a quiet
    run on the CPU."""
    device = config.run.device
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


def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "AudioConfig",
    "DataConfig",
    "EncoderConfig",
    "LLMConfig",
    "ModelConfig",
    "ObjectivesConfig",
    "ParallelConfig",
    "QFormerConfig",
    "RunConfig",
    "TextConfig",
    "TrainConfig",
    "ViTConfig",
    "load_config",
    "parse_overrides",
    "validate",
    "validate_device",
    "validate_interleaving",
    "validate_world",
]
