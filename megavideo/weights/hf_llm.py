"""Mistral-architecture weights in the common Hugging Face layout <-> the stage-3 LLM decoder.

Hugging Face keys (``MistralForCausalLM``, safetensors, possibly in several files)::

    model.embed_tokens.weight                       llm.embedding.word_embeddings.weight
    model.layers.<i>.input_layernorm.weight         llm.decoder.layers.<i>.input_layernorm.weight
    model.layers.<i>.self_attn.{q,k,v}_proj.weight  llm.decoder.layers.<i>.self_attention.linear_qkv.weight
    model.layers.<i>.self_attn.o_proj.weight        llm.decoder.layers.<i>.self_attention.linear_proj.weight
    model.layers.<i>.post_attention_layernorm.weight  llm.decoder.layers.<i>.pre_mlp_layernorm.weight
    model.layers.<i>.mlp.{gate,up}_proj.weight      llm.decoder.layers.<i>.mlp.linear_fc1.weight
    model.layers.<i>.mlp.down_proj.weight           llm.decoder.layers.<i>.mlp.linear_fc2.weight
    model.norm.weight                               llm.decoder.final_layernorm.weight
    lm_head.weight                                  llm.output_layer.weight

megatron-core fuses q, k and v per query group: for each of the ``kv`` groups, its ``heads / kv``
query heads, then its key head, then its value head. The SwiGLU input projection is [gate; up].
Names on the right are single-rank names; :func:`parallel.tensors.take_shard` cuts them for a
TP rank (the fused qkv splits by whole query groups, [gate; up] per half).

LoRA adapters (``<linear>.lora.adapters.<part>.{a,b}``, one per Hugging Face projection) are
written merged into their projection, ``W + alpha / r B A`` (:func:`hf_state`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from megavideo.config import LLMConfig
from megavideo.models.lora import adapter_of
from megavideo.weights.files import open_weights

Tensor = torch.Tensor
_LAYER = re.compile(r"^llm\.decoder\.layers\.(\d+)\.(.+)$")
_PLAIN = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "llm.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "llm.decoder.final_layernorm.weight": "model.norm.weight",
    "llm.output_layer.weight": "lm_head.weight",
}


def hf_keys(name: str) -> list[str]:
    """The Hugging Face tensors a single-rank LLM parameter is made of."""
    if name in _TOP:
        return [_TOP[name]]
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"{name} is not an LLM decoder parameter")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _PLAIN:
        return [prefix + _PLAIN[rest]]
    if rest == "self_attention.linear_qkv.weight":
        return [f"{prefix}self_attn.{x}_proj.weight" for x in "qkv"]
    if rest == "mlp.linear_fc1.weight":
        return [f"{prefix}mlp.{x}_proj.weight" for x in ("gate", "up")]
    raise KeyError(f"{name} has no Hugging Face counterpart")


def to_megatron(name: str, tensors: list[Tensor], llm: LLMConfig) -> Tensor:
    """Hugging Face tensors (in :func:`hf_keys` order) -> the single-rank parameter."""
    if name.endswith("linear_qkv.weight"):
        q, k, v = tensors
        groups, width = llm.num_kv_heads, q.shape[-1]
        per_group = q.shape[0] // groups
        return torch.cat([q.reshape(groups, per_group, width), k.reshape(groups, -1, width),
                          v.reshape(groups, -1, width)], dim=1).reshape(-1, width)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(tensors)
    return tensors[0]


def to_hf(name: str, tensor: Tensor, llm: LLMConfig) -> dict[str, Tensor]:
    """The inverse of :func:`to_megatron`."""
    keys = hf_keys(name)
    if name.endswith("linear_qkv.weight"):
        groups, width = llm.num_kv_heads, tensor.shape[-1]
        head_dim = llm.hidden_size // llm.num_heads
        per_group = llm.num_heads // groups * head_dim
        q, k, v = tensor.reshape(groups, -1, width).split([per_group, head_dim, head_dim], dim=1)
        parts = [q.reshape(-1, width), k.reshape(-1, width), v.reshape(-1, width)]
    elif name.endswith("linear_fc1.weight"):
        parts = list(tensor.chunk(2))
    else:
        parts = [tensor]
    return {key: part.contiguous() for key, part in zip(keys, parts, strict=True)}


def reader(path: str | Path) -> Callable[[str], Tensor]:
    """``get(key)``: one tensor of a Hugging Face checkpoint file or folder, read when asked for."""
    weights = open_weights(path)

    def get(key: str) -> Tensor:
        if key not in weights:
            raise KeyError(f"{path} has no tensor {key} (a Mistral-architecture checkpoint in the "
                           "Hugging Face layout is expected)")
        return weights[key]

    return get


def hf_state(state: dict[str, Tensor], llm: LLMConfig) -> dict[str, Tensor]:
    """Single-rank LLM tensors -> Hugging Face tensors, LoRA adapters merged into their
    projections in fp32 (an adapter's part is named after its projection: q, gate, ...)."""
    out: dict[str, Tensor] = {}
    adapters: dict[str, dict[str, Tensor]] = {}
    for name, tensor in state.items():
        found = adapter_of(name)
        if found is None:
            out.update(to_hf(name, tensor, llm))
            continue
        base, part, matrix = found
        keys = hf_keys(base)
        key = keys[0] if len(keys) == 1 else next(k for k in keys if f".{part}_proj." in k)
        adapters.setdefault(key, {})[matrix] = tensor
    scale = llm.lora_alpha / llm.lora_rank
    for key, ab in adapters.items():
        out[key] = (out[key].float() + scale * ab["b"].float() @ ab["a"].float()).to(out[key].dtype)
    return out


def write_hf(state: dict[str, Tensor], llm: LLMConfig, out: Path,
             dtype: torch.dtype = torch.bfloat16) -> None:
    """Single-rank LLM tensors (LoRA merged) -> ``out/model.safetensors`` and a ``config.json``
    that ``transformers`` reads as MistralForCausalLM."""
    from safetensors.torch import save_file

    tensors = {k: v.to(dtype).contiguous() for k, v in hf_state(state, llm).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
        "intermediate_size": llm.mlp_hidden_size, "vocab_size": llm.vocab_size,
        "max_position_embeddings": llm.max_positions, "rope_theta": llm.rope_base,
        "rms_norm_eps": llm.norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
        "head_dim": llm.hidden_size // llm.num_heads, "sliding_window": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["hf_keys", "hf_state", "reader", "to_hf", "to_megatron", "write_hf"]
