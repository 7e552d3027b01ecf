"""The schema of a run config: one dataclass per section, their defaults and what each key means.

A run config has the sections ``stage``, ``model``, ``parallel``, ``train``, ``data``, ``run``,
``checkpoint`` and ``profile``; the ``model`` section's type is the stage's (:data:`MODEL_SECTIONS`).
Loading (:mod:`.loading`) builds these from YAML and overrides on OmegaConf; the rules between
keys live in :mod:`.validation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOCAB_MULTIPLE = 128  # the text vocabulary is padded to a multiple of this, whatever the tp
STAGE2_TERMS = ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")


# train.fusions: each name switches on one fused kernel (the TransformerConfig field): megatron-
# core's, and InternVideo2's residual chain and full-width q/k norm (kernels.fused, compiled).
# auto: the ones a GPU runs; none on the CPU, where every layout computes the same numbers
FUSIONS = {
    "bias_activation": "bias_activation_fusion",
    "bias_dropout": "bias_dropout_fusion",
    "masked_softmax": "masked_softmax_fusion",
    "rope": "apply_rope_fusion",
    "persist_layer_norm": "persist_layer_norm",
    "gradient_accumulation": "gradient_accumulation_fusion",
    "residual": "fused_residual",
    "qk_norm": "fused_qk_norm",
}
ATTENTION_KERNELS = ("auto", "sdpa", "flash", "unfused")  # train.attention (kernels.attention)
OPTIMIZERS = ("adam", "sgd")  # what megatron-core 0.16.1's get_megatron_optimizer builds
LR_SCHEDULES = ("cosine", "linear", "constant", "WSD", "inverse-square-root")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


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
    sep: bool = True  # end a caption with [SEP] (the official tokenizer does not: false)
    clean_captions: bool = False  # the official caption cleaning first (tokenizer.clean_caption)
    weights: str = ""  # a BertForMaskedLM checkpoint (Hugging Face layout) imported at start-up
    max_positions: int = 512
    type_vocab_size: int = 2


@dataclass
class AudioConfig(PostNormEncoderConfig):
    """The stage-2 audio encoder: BEATs (post-norm with DeepNorm residual scaling) on 16 kHz
    log-mel filterbanks, 16x16 patches of a [frames, mel_bins] image."""

    enabled: bool = False
    frozen: bool = True  # needs weights: model.audio.weights or a stage-2 checkpoint.load
    weights: str = ""  # an official BEATs checkpoint (cfg + model) imported at start-up
    patch_size: int = 16
    patch_dim: int = 512  # width of the patch convolution, projected to hidden_size
    mel_bins: int = 128
    seconds: float = 10.0  # audio per clip: longer is cut, shorter padded and masked
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    deep_norm: bool = True
    relative_position: bool = True  # BEATs' gated relative position bias
    num_buckets: int = 320  # its offset buckets (half per sign)
    max_distance: int = 800  # the offset of its last bucket

    @property
    def frames(self) -> int:
        """Filterbank frames of ``seconds`` of audio (25 ms windows every 10 ms), whole patches."""
        frames = int((self.seconds * 1000 - 25) // 10) + 1
        return frames // self.patch_size * self.patch_size

    @property
    def tokens(self) -> int:
        """Patch tokens of a clip's filterbank: [frames, mel_bins] in patch_size squares."""
        return (self.frames // self.patch_size) * (self.mel_bins // self.patch_size)


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
    # LoRA (tuning lora) on q, k, v, o, gate, up, down and lm_head, VideoChat2's r 16, alpha 32,
    # dropout 0.1 on the adapters' input
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
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
    dropout: float = 0.0  # BERT's hidden and attention dropout (VideoChat2 trains with 0.1)
    # bert-base-uncased in the Hugging Face layout, or a released VideoChat2 / InternVideo2-Chat
    # QFormer (its query tokens, video LayerNorm and projection too), imported at start-up
    weights: str = ""
    # drop_path (inherited): stochastic depth rising linearly over the layers to this value on
    # every branch, per sample (VideoChat2 trains with 0.2)
    # The QFormer's own text (BERT's word and position embeddings and its text FFN): the
    # captions of the align sub-stage, the instruction after the queries with text_input
    text_input: bool = False  # VideoChat2's qformer_text_input: the instruction read with the queries
    vocab_file: str = ""  # BERT's vocab.txt (bert-base-uncased's); [DEC] is added after it
    max_text_length: int = 32  # tokens per text, [CLS] and [SEP] included
    max_positions: int = 512

    @property
    def queries(self) -> int:
        return self.num_queries + self.extra_queries


@dataclass
class AlignConfig:
    """Sub-stage ``align``: the QFormer aligned to the frozen video encoder without an LLM, as
    VideoChat2's first stage (BLIP-2's objectives): contrast (VTC), matching with hard negatives
    (VTM) and captioning (CAP, causal text over the queries)."""

    embed_dim: int = 768  # contrastive projection width
    temperature: float = 0.07  # initial value; learnable, clamped to [0.001, 0.5]
    similarity: str = "mean"  # over the queries: mean (VideoChat2) | max (BLIP-2)
    label_smoothing: float = 0.1  # the captioning loss's (BLIP-2's BertLMHeadModel)
    vtc: float = 1.0
    vtm: float = 1.0
    cap: float = 1.0


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
    """What every stage's model has: the video encoder (stage 1's student) and its attention
    pool. Each stage's section (:data:`MODEL_SECTIONS`) adds its own parts."""

    preset: str = ""  # a model file configs/models/<preset>.yaml (its keys of this stage's section)
    student: ViTConfig = field(default_factory=ViTConfig)
    aligner_norm_eps: float = 1e-5  # the LayerNorm of the attention pool and of the aligners


@dataclass
class Stage1ModelConfig(ModelConfig):
    """Stage 1: the student distilled from two frozen teachers through aligners on its last
    layers, on the visible tokens of masked clips."""

    clip_teacher: ViTConfig = field(default_factory=ViTConfig)
    mae_teacher: ViTConfig = field(default_factory=ViTConfig)
    clip_layers: int = 6  # CLIP aligners on the student's last clip_layers layers
    mae_layers: int = 4  # MAE aligners on the student's last mae_layers layers
    mask_ratio: float = 0.8
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # clip, final, mae


@dataclass
class Stage2ModelConfig(ModelConfig):
    """Stage 2: the student as video encoder (on masked clips), the text and audio encoders and
    the objectives between them."""

    mask_ratio: float = 0.8
    image_mask_ratio: float = 0.5  # of an image's patches, on image steps
    # an image's position embedding: "mean" the video table's mean over frames (InternVideo2-6B),
    # "own" a table of its own, embed.img_pos_embed (1B)
    image_pos_embed: str = "mean"
    # train as the official code where it departs from the exact math (docs/stage2.md)
    official_recipe: bool = False
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)


@dataclass
class Stage3ModelConfig(ModelConfig):
    """Stage 3: the student as video encoder (whole clips), the QFormer and the LLM decoder."""

    # VideoChat2's sub-stages: align (QFormer and video encoder, no LLM), caption (captions
    # into the LLM, frozen there), instruct (instruction data, the LLM with LoRA)
    substage: str = "instruct"
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    video_frozen: bool = False  # freeze the video encoder
    # a released InternVideo2-Chat model (its folder or file): the video encoder, the QFormer and
    # the LLM with its LoRA adapters, imported at start-up (after llm.weights and qformer.weights)
    weights: str = ""


MODEL_SECTIONS: dict[int, type[ModelConfig]] = {
    1: Stage1ModelConfig, 2: Stage2ModelConfig, 3: Stage3ModelConfig,
}


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
    # stage 1: the frozen teachers' TP degree (0: parallel.tp); it divides parallel.tp and the rest
    # of the TP group splits the clips (1: a whole copy of each teacher per rank, no TP traffic)
    teacher_tp: int = 0
    # reduce gradients in buckets during the backward pass; null: on a GPU run, off on the CPU
    overlap_grad_reduce: bool | None = None
    # with the distributed optimizer: all-gather the updated parameters during the next forward;
    # null: on a GPU run with the distributed optimizer and the overlapped reduce, else off
    overlap_param_gather: bool | None = None
    # Transformer Engine's TP communication overlap (userbuffers: the SP all-gathers and
    # reduce-scatters of the video encoder's linears split and pipelined with their GEMMs);
    # null: on with TE's spec on GPUs at tp > 1 with SP in stages 1 and 2, else off
    tp_comm_overlap: bool | None = None

    @property
    def encoder_tp_size(self) -> int:
        return self.encoder_tp or self.tp

    @property
    def teacher_tp_size(self) -> int:
        return self.teacher_tp or self.tp


FP8_BACKENDS = ("auto", "te", "torchao")
FP8_RECIPES = {  # what each backend offers (megatron-core 0.16.1's TE recipes; torchao's float8)
    "te": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "torchao": ("tensorwise", "rowwise"),
}


@dataclass
class FP8Config:
    """``train.precision=fp8``: the transformer layers' GEMMs in FP8 on bf16 weights, through
    Transformer Engine (the TE spec) or torchao's float8 training (the local spec); embeddings,
    norms, attention, heads and aligners stay bf16 (docs/performance.md)."""

    backend: str = "auto"  # auto (te on the TE spec, torchao on the local spec) | te | torchao
    # te: hybrid (e4m3 forward, e5m2 gradients) | e4m3 (everywhere); torchao's recipe fixes it
    format: str = "hybrid"
    # te: delayed | tensorwise | blockwise | mxfp8 (Blackwell); torchao: tensorwise | rowwise
    recipe: str = "tensorwise"
    amax_history: int = 1024  # delayed scaling: the amax history's length
    amax_algo: str = "max"  # delayed scaling: max | most_recent over the history
    margin: int = 0  # delayed scaling: the scale's margin (powers of 2)
    bf16_first_layers: int = 0  # the first layers of each transformer kept in bf16
    bf16_last_layers: int = 0  # the last layers of each transformer kept in bf16
    teachers: bool = False  # stage 1: the frozen teachers' forward in FP8 too


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
    precision: str = "fp32"  # fp32 | bf16 | fp8 (bf16 weights, FP8 GEMMs: the fp8 section)
    recompute: str = "none"  # none | selective | full
    optimizer: str = "adam"  # adam (AdamW: decoupled weight decay) | sgd
    momentum: float = 0.9  # sgd's
    lr_schedule: str = "cosine"  # cosine | linear | constant | WSD | inverse-square-root
    lr_decay_steps: int = 0  # steps from the start to min_lr (0: train.steps)
    wsd_decay_steps: int = 0  # WSD: the last steps of the decay, where it anneals
    wsd_decay_style: str = "exponential"  # WSD's anneal: exponential | linear | cosine | minus_sqrt
    # megatron-core fused kernels (FUSIONS); auto: on a GPU the ones this node runs, none on the CPU
    fusions: list[str] = field(default_factory=lambda: ["auto"])
    # core attention: auto | sdpa | flash | unfused (megatron-core's whole score matrix)
    attention: str = "auto"
    fp8: FP8Config = field(default_factory=FP8Config)

    @property
    def bf16(self) -> bool:
        """Weights and activations in bf16: precision bf16, or fp8 (FP8 GEMMs on bf16 weights)."""
        return self.precision in ("bf16", "fp8")


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
    # PyAV decode processes, or DALI threads, per decoding rank; null: the CPUs the task has
    # (SLURM's --cpus-per-task, or this process's CPUs shared by the node's ranks) less one
    workers: int | None = None
    prefetch: int = 2  # micro-batches decoded ahead
    decode_threads: int = 1  # FFmpeg threads per PyAV decode
    # stop when more than this share of the last skip_window decode attempts failed (early on,
    # more than this share of skip_window attempts: one bad file cannot stop a run at step 0)
    max_skip_rate: float = 0.05
    skip_window: int = 2000
    # stage 2: manifest keys a clip's caption is drawn from, uniformly among every caption the
    # listed keys hold for it (e.g. caption, captions, asr_captions, avs_captions)
    captions: list[str] = field(default_factory=lambda: ["caption"])
    # stage 3's caption sub-stage: a file of prompts, one per line, "<VideoHere>" where the
    # video goes (VideoChat2's prompts/concise_description.txt), one drawn per sample; and the
    # caption's tokens, its </s> included (longer captions are cut, as the official max_txt_l)
    caption_prompts: str = ""
    caption_tokens: int = 32
    # stage 3's instruction data: the video turn says when its frames were sampled ("The video
    # contains 8 frames sampled at 0.5, 1.7, ... seconds."; VideoChat2's add_second_msg, on in
    # its Mistral configs)
    time_message: bool = False
    # image data (stage 2's image-text pairs, stage 3's image instruction rows): a manifest of
    # images (python -m launch.manifest on an annotation file with "image" entries), read as
    # 1-frame clips on image steps
    image_manifest: str = ""
    # the share of image steps; null: in proportion to the manifests' sizes (the official
    # mixture); with synthetic data, synthetic 1-frame clips
    image_fraction: float | None = None
    # stage 3's text-only instruction data: a JSON or JSON Lines file of rows with "QA" pairs
    # and no media, read on text steps (no video encoder, no queries in the prompt)
    text_manifest: str = ""
    # the share of text steps; null: in proportion to the data's sizes; with synthetic data,
    # synthetic questions without their clip
    text_fraction: float | None = None


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <run.dir>/checkpoints
    interval: int = 0  # save every N steps (0: by time, at the end and on SIGUSR1/SIGTERM)
    # also save when this many minutes have passed since the last save (0: off): a crash (a
    # node failure, kill -9) loses at most this much training
    every_minutes: float = 30.0
    keep: int = 3  # keep the last K checkpoints
    save_at_end: bool = True
    load: str = ""  # start a new run from these weights (a checkpoint directory or its root)
    # write each save in a forked process while training goes on (megatron-core's async
    # torch_dist save); the checkpoint becomes `latest` once every rank has written its share
    async_save: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    # auto: the GPUs torch sees (NCCL), else the CPU (gloo), but an error where the job was given
    # GPUs torch cannot see; cuda: refuse to start without them; cpu: the CPU, on a GPU-less node
    device: str = "auto"
    timeout_minutes: int = 30  # how long a collective waits for its peers before the job fails


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
    model: ModelConfig = field(default_factory=Stage1ModelConfig)  # MODEL_SECTIONS[stage]
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

    @property
    def mixes_media(self) -> bool:
        """Stage 2, or stage 3's instruction tuning: the stages whose data may mix media."""
        return self.stage == 2 or (self.stage == 3 and self.model.substage == "instruct")

    @property
    def uses_images(self) -> bool:
        """Image steps (stage 2, stage 3's instruct): an image manifest, or a share of
        synthetic image steps."""
        data = self.data
        return self.mixes_media and bool(data.image_manifest if data.source == "manifest"
                                    else data.image_fraction)

    @property
    def uses_text(self) -> bool:
        """Stage 3's text-only steps: a text manifest, or a share of synthetic text steps."""
        data = self.data
        return self.stage == 3 and self.mixes_media and bool(
            data.text_manifest if data.source == "manifest" else data.text_fraction)

    def image_steps(self) -> Config:
        """The image steps as a config of their own: 1-frame clips (stage 2's at
        ``model.image_mask_ratio``, without audio; stage 3's without the time message), what
        such a step's tokens and FLOPs follow."""
        model = self.model
        student = dataclasses.replace(model.student, num_frames=1)
        if self.stage == 3:
            return dataclasses.replace(self, model=dataclasses.replace(model, student=student),
                                       data=dataclasses.replace(self.data, time_message=False))
        audio = dataclasses.replace(model.audio, enabled=False)
        return dataclasses.replace(self, model=dataclasses.replace(
            model, student=student, mask_ratio=model.image_mask_ratio, audio=audio))

