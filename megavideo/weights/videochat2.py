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
and ``qformer.bert.embeddings.position_ids`` (a buffer).
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

from megavideo.config import Stage3ModelConfig
from megavideo.models.lora import adapter_of
from megavideo.weights import hf_llm
from megavideo.weights.internvideo2 import VISION, _mapping, qkv_to_megatron, qkv_to_official

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


__all__ = ["LM_PREFIX", "VISION_PREFIX", "is_chat_file", "llm_keys", "llm_to_file", "video_key",
           "video_to_file", "video_to_megatron"]
