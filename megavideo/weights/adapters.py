"""Weights a model takes from somewhere other than its own checkpoints, as state-dict adapters.

The checkpointer reads, shards and copies; what is model-specific sits here, behind one
interface (:class:`Adapter`): which of this model's parameters (canonical, single-rank names) a
source fills and under which key, the single-rank shape the source stores it at, and how that
tensor becomes this model's. The sources:

- :class:`EarlierStage`: a later stage's video encoder from an earlier stage's checkpoint (any
  layout), its position embedding resampled to this stage's frame count (and averaged over the
  frames for stage 2's own image table);
- :class:`ImportedWeights`: a released checkpoint in another layout, whole tensors read from its
  file: :class:`HuggingFaceLLM` (the stage-3 LLM, Mistral in the Hugging Face layout,
  :mod:`megavideo.weights.hf_llm`), :class:`HuggingFaceBert` (stage 2's text encoder,
  :mod:`megavideo.weights.hf_bert`), :class:`OfficialBeats` (stage 2's audio encoder,
  :mod:`megavideo.weights.beats`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megavideo.config import (
    AudioConfig,
    Config,
    ConfigError,
    LLMConfig,
    QFormerConfig,
    Stage3ModelConfig,
    TextConfig,
)
from megavideo.models.embedding import frame_mean, interpolate_frames
from megavideo.models.lora import is_lora
from megavideo.weights import beats, hf_bert, hf_llm, qformer, videochat2
from megavideo.weights.files import open_weights

VIDEO_ENCODER = ("embed", "blocks", "pool")  # what a later stage takes from an earlier one
IMAGE_POS_EMBED = "embed.img_pos_embed"  # stage 2's own image table (model.image_pos_embed own)
# model keys that change no tensor (where the weights came from, dropout, the sequence length)
SHAPELESS = {"preset", "mask_ratio", "drop_path", "weights", "dropout", "lora_dropout", "max_length"}


def model_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """``key saved != current`` for every model config key that shapes a tensor (a key the saved
    config lacks, written before the key existed, is taken to be at the default it had then)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key not in saved:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_differences(a, b, f"{prefix}.{key}")
        elif a != b and key not in SHAPELESS:
            out.append(f"{prefix}.{key} {a!r} != {b!r}")
    return out


class Adapter:
    """A source's view of this model's parameters (override what differs from the identity)."""

    source = ""  # what the weights come from, for the log

    def key(self, name: str) -> str | None:
        """The source's name for this model's parameter ``name`` (a single-rank name), or None
        where the source does not fill it."""
        raise NotImplementedError

    def stored_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The single-rank shape the source stores ``name`` at (this model's is ``shape``)."""
        return shape

    def adapt(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The source's tensor of ``name`` as this model's."""
        return tensor


class EarlierStage(Adapter):
    """The video encoder (the student's ``embed``, ``blocks`` and ``pool``) of an earlier stage's
    checkpoint, for a later stage (stage 3 keeps it under ``video.``)."""

    def __init__(self, path: Path, meta: dict, cfg: Config) -> None:
        saved = meta["config"]["model"]["student"]
        ignored = {"num_frames", "drop_path", "preset"}
        differences = [d for d in model_differences(saved, _student(cfg), "model.student")
                       if d.split()[0].rsplit(".", 1)[-1] not in ignored]
        if differences:
            raise ConfigError(f"checkpoint {path} holds another video encoder: "
                              f"{'; '.join(differences[:3])}.")
        student = cfg.model.student
        self.frames = (saved["num_frames"] // saved["tubelet_size"],
                       student.num_frames // student.tubelet_size)
        self.stage = meta["config"].get("stage", 1)
        self.source = f"the video encoder of stage {self.stage} at {path}"

    def key(self, name: str) -> str | None:
        name = name.removeprefix("video.")
        if name == IMAGE_POS_EMBED:  # stage 2's image table: the video table's frame mean
            return "embed.pos_embed"
        return name if name.split(".")[0] in VIDEO_ENCODER else None

    def _resampled(self, name: str) -> bool:
        name = name.removeprefix("video.")
        return name == IMAGE_POS_EMBED or (name == "embed.pos_embed" and len(set(self.frames)) == 2)

    def stored_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self._resampled(name):
            return shape
        frames = 1 if name.removeprefix("video.") == IMAGE_POS_EMBED else self.frames[1]
        per_frame = (shape[0] - 1) // frames
        return (1 + per_frame * self.frames[0], shape[1])

    def adapt(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.removeprefix("video.") == IMAGE_POS_EMBED:
            return frame_mean(tensor, self.frames[0], True)
        return interpolate_frames(tensor, *self.frames, True) if self._resampled(name) else tensor


def substage(config: dict) -> str:
    """A config's (as a dict) stage-3 sub-stage; "" for other stages."""
    if config.get("stage", 1) != 3:
        return ""
    return config.get("model", {}).get("substage", "instruct")


class OtherSubstage(EarlierStage):
    """Another stage-3 sub-stage's checkpoint, whose tensor keys and whole shapes are
    ``stored``: each tensor both models have, the video encoder's position embedding resampled
    to this sub-stage's frame count."""

    def __init__(self, path: Path, meta: dict, cfg: Config, stored: dict[str, tuple]) -> None:
        super().__init__(path, meta, cfg)
        self.stored = stored
        self.source = f"the {substage(meta['config'])} sub-stage at {path}"

    def key(self, name: str) -> str | None:
        return name if f"model.{name}" in self.stored else None

    def _resampled(self, name: str) -> bool:
        return name == "video.embed.pos_embed" and len(set(self.frames)) == 2


class ImportedWeights(Adapter):
    """Weights of a released checkpoint in another layout (the file the config key ``config_key``
    names): :meth:`check` lists every tensor the file lacks in one sentence, :meth:`read` gives each
    whole single-rank tensor, checked against this model's shape."""

    config_key = ""
    what = ""  # the kind of checkpoint, for messages

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.weights = open_weights(path)
        except ValueError as err:
            raise ConfigError(f"{self.config_key}: {err}") from None
        self.source = f"{self.what} at {path}"

    def sources(self, name: str) -> list[str]:
        """The file's keys the parameter ``name`` is made of."""
        raise NotImplementedError

    def convert(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The file's tensors (in :meth:`sources` order) as the single-rank parameter."""
        raise NotImplementedError

    def find(self, key: str) -> str | None:
        """The file's spelling of ``key`` (override for aliases), None where it lacks it."""
        return key if key in self.weights else None

    def check(self, names: list[str]) -> None:
        """Raise ConfigError naming the tensors of ``names`` the file lacks (all of them)."""
        missing = [k for name in names for k in self.sources(name) if self.find(k) is None]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                              else "")
            raise ConfigError(f"{self.config_key}: {self.path} is not {self.what}: it lacks "
                              f"{len(missing)} of the tensors the model needs ({shown}).")

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole single-rank fp32 tensor of ``name``, checked against this model's ``shape``."""
        tensors = [self.weights[self.find(k)] for k in self.sources(name)]
        try:
            full = self.convert(name, tensors)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"{self.config_key}: {self.path}: {err}.") from None
        if tuple(full.shape) != shape:
            raise ConfigError(f"{self.config_key}: {name} is {tuple(full.shape)} in {self.path} "
                              f"but the config makes it {shape}.")
        return full.float()


class HuggingFaceLLM(ImportedWeights):
    """The stage-3 LLM's weights from a Mistral-architecture checkpoint in the Hugging Face
    layout (LoRA adapters start fresh)."""

    config_key, what = "model.llm.weights", "a Mistral-architecture checkpoint in the Hugging Face layout"

    def __init__(self, path: str, llm: LLMConfig) -> None:
        super().__init__(path)
        self.llm = llm

    def key(self, name: str) -> str | None:
        return name if name.startswith("llm.") and not is_lora(name) else None

    def sources(self, name: str) -> list[str]:
        return hf_llm.hf_keys(name)

    def convert(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return hf_llm.to_megatron(name, tensors, self.llm)


class QFormerWeights(ImportedWeights):
    """The stage-3 QFormer from bert-base-uncased in the Hugging Face layout or from a released
    VideoChat2 / InternVideo2-Chat file (:mod:`megavideo.weights.qformer`); what the file lacks
    keeps its initialisation."""

    config_key, what = "model.qformer.weights", "a BERT or VideoChat2 QFormer checkpoint"

    def __init__(self, path: str, config: QFormerConfig, vocab: int = 0) -> None:
        super().__init__(path)
        self.config, self.vocab = config, vocab
        try:
            self.keys = qformer.QFormerKeys(set(self.weights.keys()))
        except ValueError as err:
            raise ConfigError(f"{self.config_key}: {path} is not {self.what}: {err}.") from None

    def key(self, name: str) -> str | None:
        return name if name.startswith("qformer.") and self.keys.sources(name) else None

    def sources(self, name: str) -> list[str]:
        return self.keys.sources(name) or []

    def find(self, key: str) -> str | None:
        return next((k for k in (key, hf_bert.legacy_name(key)) if k in self.weights), None)

    def convert(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return qformer.to_megatron(name, tensors, self.config, self.vocab)


class InternVideo2Chat(ImportedWeights):
    """A released InternVideo2-Chat model (``model.weights``: its folder or file): the video
    encoder, the QFormer (the instruction read with the queries) and Mistral with its LoRA
    adapters unmerged (:mod:`megavideo.weights.videochat2`); a position table of another frame
    count is resampled to ``model.student.num_frames``."""

    config_key, what = "model.weights", "an InternVideo2-Chat checkpoint"

    def __init__(self, path: str, model: Stage3ModelConfig, vocab: int) -> None:
        super().__init__(path)
        keys = set(self.weights.keys())
        if not videochat2.is_chat_file(keys):
            raise ConfigError(f"{self.config_key}: {path} is not {self.what} (no "
                              f"{videochat2.VISION_PREFIX}* and {videochat2.LM_PREFIX}* tensors).")
        self.model, self.vocab = model, vocab
        self.qformer = qformer.QFormerKeys(keys)

    def key(self, name: str) -> str | None:
        return name if self.sources(name) else None

    def sources(self, name: str) -> list[str]:
        part = name.split(".")[0]
        if part == "video":
            key = videochat2.video_key(name, self.model)
            return [key] if key else []
        if part == "qformer":
            return self.qformer.sources(name) or []
        if part == "llm":
            return videochat2.llm_keys(name)
        return []

    def find(self, key: str) -> str | None:
        return next((k for k in (key, hf_bert.legacy_name(key)) if k in self.weights), None)

    def convert(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        part = name.split(".")[0]
        if part == "qformer":
            return qformer.to_megatron(name, tensors, self.model.qformer, self.vocab)
        if part == "llm":
            return tensors[0] if is_lora(name) else hf_llm.to_megatron(name, tensors,
                                                                        self.model.llm)
        tensor = videochat2.video_to_megatron(name, tensors[0], self.model)
        student = self.model.student
        if name == "video.embed.pos_embed" and tensor.shape[0] != 1 + student.num_patches:
            frames = (tensor.shape[0] - 1) // student.patches_per_frame
            tensor = interpolate_frames(tensor, frames, student.num_frames // student.tubelet_size,
                                        True)
        return tensor


class HuggingFaceBert(ImportedWeights):
    """The stage-2 text encoder and its MLM head from a ``BertForMaskedLM`` checkpoint in the
    Hugging Face layout (bert-large-uncased), or from a file that keeps one under a prefix (an
    official InternVideo2 stage-2 file: ``text_encoder.``). The fusion layers' cross-attention
    comes from the file where it has it, else keeps its initialisation (the official code's: a
    fresh BERT layer's)."""

    config_key, what = "model.text.weights", "a BertForMaskedLM checkpoint in the Hugging Face layout"

    def __init__(self, path: str, text: TextConfig, vocab: int) -> None:
        super().__init__(path)
        self.text, self.vocab = text, vocab
        prefix = hf_bert.source_prefix(self.weights.keys())
        if prefix is None:
            raise ConfigError(f"{self.config_key}: {path} is not {self.what} (it has no "
                              f"bert.{hf_bert.WORD_EMBEDDINGS}).")
        self.prefix = prefix
        self.crosses = any(".crossattention." in k for k in self.weights.keys())

    def key(self, name: str) -> str | None:
        if not hf_bert.is_text(name) or (hf_bert.is_cross_attention(name) and not self.crosses):
            return None
        return self.sources(name)[0]

    def sources(self, name: str) -> list[str]:
        return [self.prefix + k for k in hf_bert.hf_keys(name)]

    def find(self, key: str) -> str | None:
        return next((k for k in (key, hf_bert.legacy_name(key)) if k in self.weights), None)

    def convert(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return hf_bert.to_megatron(name, tensors, self.text, self.vocab)


class OfficialBeats(ImportedWeights):
    """The stage-2 audio encoder from an official BEATs checkpoint (its ``cfg`` checked against
    ``model.audio``), or from a file that keeps one under a prefix (an official InternVideo2
    stage-2 file: ``audio_encoder.``)."""

    config_key, what = "model.audio.weights", "a BEATs checkpoint"

    def __init__(self, path: str, audio: AudioConfig) -> None:
        super().__init__(path)
        self.audio = audio
        marker = "patch_embedding.weight"
        found = sorted(k.removesuffix(marker) for k in self.weights.keys() if k.endswith(marker))
        if not found:
            raise ConfigError(f"{self.config_key}: {path} is not {self.what} (it has no "
                              f"{marker}).")
        self.prefix = found[0]
        cfg = self.weights.extra.get("cfg")
        differences = beats.cfg_differences(cfg, audio) if isinstance(cfg, dict) else []
        if differences:
            raise ConfigError(f"{self.config_key}: {path} holds another BEATs than model.audio: "
                              f"{'; '.join(differences[:3])}.")

    def key(self, name: str) -> str | None:
        return self.sources(name)[0] if beats.is_audio(name) else None

    def sources(self, name: str) -> list[str]:
        return [self.prefix + k for k in beats.beats_keys(name)]

    def find(self, key: str) -> str | None:
        return beats.spelling(key, self.weights, self.prefix)

    def convert(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return beats.to_megatron(name, tensors, self.audio)


def released_weights(cfg: Config, vocab: int | None = None) -> list[ImportedWeights]:
    """The released checkpoints ``cfg`` imports at start-up (``model.llm.weights``,
    ``model.qformer.weights``, ``model.text.weights``, ``model.audio.weights``); ``vocab``:
    stage 2's tokenizer size."""
    model = cfg.model
    out: list[ImportedWeights] = []
    if cfg.stage == 3:
        if model.llm.weights:
            out.append(HuggingFaceLLM(model.llm.weights, model.llm))
        vocab = qformer.text_vocab(model) if model.qformer.weights or model.weights else 0
        if model.qformer.weights:
            out.append(QFormerWeights(model.qformer.weights, model.qformer, vocab))
        if model.weights:
            out.append(InternVideo2Chat(model.weights, model, vocab))
        return out
    if cfg.stage == 2 and model.text.weights:
        out.append(HuggingFaceBert(model.text.weights, model.text, vocab))
    if cfg.stage == 2 and model.audio.enabled and model.audio.weights:
        out.append(OfficialBeats(model.audio.weights, model.audio))
    return out


def _student(cfg: Config) -> dict:
    return cfg.to_dict()["model"]["student"]
