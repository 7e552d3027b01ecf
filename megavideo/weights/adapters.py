"""Weights a model takes from somewhere other than its own checkpoints, as state-dict adapters.

The checkpointer reads, shards and copies; what is model-specific sits here, behind one
interface (:class:`Adapter`): which of this model's parameters (canonical, single-rank names) a
source fills and under which key, the single-rank shape the source stores it at, and how that
tensor becomes this model's. Two sources exist:

- :class:`EarlierStage`: a later stage's video encoder from an earlier stage's checkpoint (any
  layout), its position embedding resampled to this stage's frame count;
- :class:`HuggingFaceLLM`: the stage-3 LLM from a Mistral-architecture checkpoint in the Hugging
  Face layout (:mod:`megavideo.weights.hf_llm`), whole tensors read from safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megavideo.config import Config, ConfigError, LLMConfig
from megavideo.models.embedding import interpolate_frames
from megavideo.models.lora import is_lora
from megavideo.weights import hf_llm

VIDEO_ENCODER = ("embed", "blocks", "pool")  # what a later stage takes from an earlier one
SHAPELESS = {"preset", "mask_ratio", "drop_path"}  # model keys that change no tensor


def model_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """``key saved != current`` for every model config key that shapes a tensor."""
    out = []
    for key in sorted(set(saved) | set(current)):
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
        return name if name.split(".")[0] in VIDEO_ENCODER else None

    def _resampled(self, name: str) -> bool:
        return name.removeprefix("video.") == "embed.pos_embed" and len(set(self.frames)) == 2

    def stored_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self._resampled(name):
            return shape
        per_frame = (shape[0] - 1) // self.frames[1]
        return (1 + per_frame * self.frames[0], shape[1])

    def adapt(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return interpolate_frames(tensor, *self.frames, True) if self._resampled(name) else tensor


class HuggingFaceLLM(Adapter):
    """The stage-3 LLM's weights from a Mistral-architecture checkpoint in the Hugging Face
    layout; :meth:`read` gives each whole tensor (LoRA adapters start fresh)."""

    def __init__(self, path: str, llm: LLMConfig) -> None:
        self.path, self.llm = path, llm
        self.get = hf_llm.reader(path)
        self.source = f"the Hugging Face LLM at {path}"

    def key(self, name: str) -> str | None:
        return name if name.startswith("llm.") and not is_lora(name) else None

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole single-rank tensor of ``name``, checked against this model's ``shape``."""
        try:
            full = hf_llm.to_megatron(name, [self.get(k) for k in hf_llm.hf_keys(name)], self.llm)
        except KeyError as err:
            raise ConfigError(f"model.llm.weights: {err.args[0]}.") from None
        if tuple(full.shape) != shape:
            raise ConfigError(f"model.llm.weights: {name} is {tuple(full.shape)} in {self.path} "
                              f"but the model.llm config makes it {shape}.")
        return full.float()


def _student(cfg: Config) -> dict:
    return cfg.to_dict()["model"]["student"]
