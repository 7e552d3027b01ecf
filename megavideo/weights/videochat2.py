"""The released InternVideo2-Chat-8B files (OpenGVLab/InternVideo2-Chat-8B, VideoChat2 with
InternVideo2-1B and Mistral-7B) <-> the stage-3 model.

    file (``model.safetensors.index.json`` and its shards)       stage-3 parameter
    vision_encoder.{cls_token, pos_embed, patch_embed.proj.*}   video.embed.*
    vision_encoder.blocks.<i>.{norm1, attn.qkv, attn.q_norm,    video.blocks.layers.<i>.* (the
      attn.k_norm, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}  39 blocks before the last,
                                                                as the official model keeps them)
    vision_layernorm, query_tokens, extra_query_tokens,         qformer.* (the instruction read
      qformer.bert.*, project_up                                with the queries: text_input)
    lm.base_model.model.{model.*, lm_head.weight}               llm.* (Mistral's Hugging Face
                                                                names, :mod:`.hf_llm`)
    lm.base_model.model.<projection>.lora_{A,B}.default.weight  llm.<linear>.lora.adapters.<part>.*
                                                                (peft's LoRA: unmerged)

Not read: ``vision_encoder.img_pos_embed`` (the image table; video chat does not use it),
``project_down`` (LM -> QFormer width, for a vision regression loss the chat recipe leaves off)
and ``qformer.bert.embeddings.position_ids`` (a buffer). :func:`write_chat` writes a stage-3
checkpoint back in this layout: the image table as the video table's frame mean (as stage 2 makes
its own), ``project_down`` left out.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import torch

from megavideo.config import Config, Stage3ModelConfig
from megavideo.models.embedding import frame_mean
from megavideo.models.lora import adapter_of
from megavideo.weights import hf_llm
from megavideo.weights.hf_bert import split_heads
from megavideo.weights.internvideo2 import VISION, _mapping, qkv_to_megatron, qkv_to_official
from megavideo.weights.qformer import QFormerKeys

Tensor = torch.Tensor
VISION_PREFIX, LM_PREFIX = "vision_encoder.", "lm.base_model.model."
_QKV = re.compile(r"^video\.blocks\.layers\.(\d+)\.self_attention\.linear_qkv\.weight$")
_PEFT = {"a": "lora_A", "b": "lora_B"}


def is_chat_file(keys: Collection[str]) -> bool:
    """Whether a file's keys are InternVideo2-Chat's (its vision encoder and its peft LLM)."""
    return any(k.startswith(VISION_PREFIX) for k in keys) and \
        any(k.startswith(LM_PREFIX) for k in keys)


def _video_names(model: Stage3ModelConfig) -> dict[str, str]:
    """Stage-3 video parameter -> the file's key (layer scales stored bare: ``ls1``)."""
    out = {}
    for official, ours in _mapping(VISION, model).items():
        out[f"video.{ours}"] = VISION_PREFIX + official.replace(".ls1.gamma", ".ls1").replace(
            ".ls2.gamma", ".ls2")
    out["video.embed.pos_embed"] = VISION_PREFIX + "pos_embed"
    return out


def video_key(name: str, model: Stage3ModelConfig) -> str | None:
    """The file's key of a stage-3 video-encoder parameter (None: not a video parameter)."""
    match = _QKV.match(name)
    if match:
        return f"{VISION_PREFIX}blocks.{match.group(1)}.attn.qkv.weight"
    return _video_names(model).get(name)


def llm_keys(name: str) -> list[str]:
    """The file's keys of a single-rank LLM parameter, LoRA adapters included."""
    found = adapter_of(name)
    if found is None:
        return [LM_PREFIX + k for k in hf_llm.hf_keys(name)]
    base, part, matrix = found
    keys = hf_llm.hf_keys(base)
    key = keys[0] if len(keys) == 1 else next(k for k in keys if f".{part}_proj." in k)
    return [LM_PREFIX + key.removesuffix(".weight") + f".{_PEFT[matrix]}.default.weight"]


def video_to_megatron(name: str, tensor: Tensor, model: Stage3ModelConfig) -> Tensor:
    if _QKV.match(name):
        return qkv_to_megatron(tensor, model.student.num_heads)
    if name == "video.embed.pos_embed":
        return tensor.reshape(tensor.shape[-2:])  # [1, n, C] -> [n, C]
    return tensor


def video_to_file(name: str, tensor: Tensor, model: Stage3ModelConfig) -> Tensor:
    """The inverse of :func:`video_to_megatron`."""
    if _QKV.match(name):
        return qkv_to_official(tensor, model.student.num_heads)
    if name == "video.embed.pos_embed":
        return tensor[None]
    return tensor


def llm_to_file(state: dict[str, Tensor], model: Stage3ModelConfig) -> dict[str, Tensor]:
    """Single-rank LLM tensors -> the file's, LoRA adapters unmerged under peft's names."""
    out = {}
    for name, tensor in state.items():
        if adapter_of(name) is not None:
            out[llm_keys(name)[0]] = tensor
        else:
            out.update({LM_PREFIX + k: v for k, v in hf_llm.to_hf(name, tensor, model.llm).items()})
    return out


# the released file's keys that fix its QFormer layout (prefix, the queries' own FFN, the
# cross-attention, the projection's name)
_RELEASED_QFORMER = QFormerKeys({
    "qformer.bert.embeddings.LayerNorm.weight", "qformer.bert.embeddings.LayerNorm.bias",
    "qformer.bert.embeddings.word_embeddings.weight",
    "qformer.bert.embeddings.position_embeddings.weight",
    "qformer.bert.encoder.layer.0.intermediate_query.dense.weight",
    "qformer.bert.encoder.layer.0.crossattention.self.query.weight", "query_tokens",
    "extra_query_tokens", "vision_layernorm.weight", "vision_layernorm.bias",
    "project_up.weight", "project_up.bias"})


def qformer_to_file(name: str, tensor: Tensor, model: Stage3ModelConfig, vocab: int
                    ) -> dict[str, Tensor]:
    """A single-rank QFormer parameter under the released names (``vocab``: its text's
    tokenizer with [DEC], the word embeddings' real rows)."""
    keys = _RELEASED_QFORMER.sources(name)
    if keys is None:
        raise KeyError(f"{name} has no InternVideo2-Chat counterpart")
    if len(keys) > 1:
        parts = split_heads(tensor, model.qformer.num_heads, len(keys))
    elif name in ("qformer.queries", "qformer.extra_queries"):
        parts = [tensor.transpose(0, 1)]  # [Q, 1, H] -> [1, Q, H]
    elif name == "qformer.word_embeddings.weight":
        parts = [tensor[:vocab]]
    else:
        parts = [tensor]
    return {k: p.contiguous() for k, p in zip(keys, parts, strict=True)}


def chat_state(state: dict[str, Tensor], cfg: Config, vocab: int) -> dict[str, Tensor]:
    """A stage-3 model's single-rank tensors -> the released InternVideo2-Chat file's."""
    model = cfg.model
    out = llm_to_file({k: v for k, v in state.items() if k.startswith("llm.")}, model)
    for name, tensor in state.items():
        if name.startswith("video."):
            out[video_key(name, model)] = video_to_file(name, tensor, model)
        elif name.startswith("qformer."):
            out.update(qformer_to_file(name, tensor, model, vocab))
    student = model.student
    pos = state["video.embed.pos_embed"]
    out[f"{VISION_PREFIX}img_pos_embed"] = frame_mean(
        pos, student.num_frames // student.tubelet_size, True)[None]
    return out


def write_chat(state: dict[str, Tensor], cfg: Config, vocab: int, out: Path,
               dtype: torch.dtype = torch.bfloat16) -> Path:
    """``out/model.safetensors`` in the released InternVideo2-Chat layout (LoRA unmerged)."""
    from safetensors.torch import save_file

    tensors = {k: v.to(dtype).contiguous() for k, v in chat_state(state, cfg, vocab).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out / "model.safetensors"


__all__ = ["LM_PREFIX", "VISION_PREFIX", "chat_state", "is_chat_file", "llm_keys", "llm_to_file",
           "qformer_to_file", "video_key", "video_to_file", "video_to_megatron", "write_chat"]
