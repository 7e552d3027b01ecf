"""Official BEATs checkpoints (``BEATs_iter3+`` files: ``{"cfg": ..., "model": ...}``) <-> the
stage-2 audio encoder.

BEATs keys (InternVideo2's stage-2 files put them under ``audio_encoder.``)::

    patch_embedding.weight                      audio.patch_embed.weight
    layer_norm                                  audio.patch_norm
    post_extract_proj                           audio.post_extract_proj
    encoder.pos_conv.0.{weight_g, weight_v, bias}  audio.pos_conv.{parametrizations.weight.original0,
                                                original1, bias}
    encoder.layer_norm                          audio.norm
    encoder.layers.0.self_attn.relative_attention_bias.weight  audio.relative_attention_bias
    encoder.layers.<i>.self_attn.{q,k,v}_proj   audio.layers.layers.<i>.self_attention.linear_qkv
    encoder.layers.<i>.self_attn.out_proj       ... self_attention.linear_proj
    encoder.layers.<i>.self_attn.grep_linear    ... self_attention.core_attention.grep_linear
    encoder.layers.<i>.self_attn.grep_a         ... self_attention.core_attention.grep_a
    encoder.layers.<i>.self_attn_layer_norm     ... input_layernorm
    encoder.layers.<i>.fc1, fc2                 ... mlp.linear_fc1, mlp.linear_fc2
    encoder.layers.<i>.final_layer_norm         ... pre_mlp_layernorm

Every layer's file entry of the shared relative-position table holds the same tensor; layer 0's is
read and written to all. The positional convolution's weight norm is read under its old
(``weight_g``/``weight_v``) or new (``parametrizations.weight.original0/1``) names, or from a plain
``weight`` (InternVideo2's copy of BEATs ran it without weight norm for a while). The fine-tuned
files' classifier (``predictor``) is not part of the model and is not read.
"""

from __future__ import annotations

import re
from collections.abc import Container

import torch

from megavideo.config import AudioConfig
from megavideo.weights.hf_bert import interleave, split_heads

Tensor = torch.Tensor
_LAYER = re.compile(r"^audio\.layers\.layers\.(\d+)\.(.+)\.(weight|bias|grep_a)$")
_IN_LAYER = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.out_proj",),
    "self_attention.core_attention.grep_linear": ("self_attn.grep_linear",),
    "input_layernorm": ("self_attn_layer_norm",),
    "mlp.linear_fc1": ("fc1",),
    "mlp.linear_fc2": ("fc2",),
    "pre_mlp_layernorm": ("final_layer_norm",),
}
_G, _V = "audio.pos_conv.parametrizations.weight.original0", \
    "audio.pos_conv.parametrizations.weight.original1"
_TOP = {
    "audio.patch_embed.weight": "patch_embedding.weight",
    "audio.patch_norm.weight": "layer_norm.weight",
    "audio.patch_norm.bias": "layer_norm.bias",
    "audio.post_extract_proj.weight": "post_extract_proj.weight",
    "audio.post_extract_proj.bias": "post_extract_proj.bias",
    "audio.pos_conv.bias": "encoder.pos_conv.0.bias",
    _G: "encoder.pos_conv.0.weight_g",
    _V: "encoder.pos_conv.0.weight_v",
    "audio.norm.weight": "encoder.layer_norm.weight",
    "audio.norm.bias": "encoder.layer_norm.bias",
    "audio.relative_attention_bias": "encoder.layers.0.self_attn.relative_attention_bias.weight",
}
# other spellings of the positional convolution's weight norm
ALIASES = {
    "encoder.pos_conv.0.weight_g": ("encoder.pos_conv.0.parametrizations.weight.original0",
                                    "encoder.pos_conv.0.weight"),
    "encoder.pos_conv.0.weight_v": ("encoder.pos_conv.0.parametrizations.weight.original1",
                                    "encoder.pos_conv.0.weight"),
}
# BEATsConfig field -> (AudioConfig field, BEATs' default)
CFG_FIELDS = {
    "encoder_layers": ("num_layers", 12), "encoder_embed_dim": ("hidden_size", 768),
    "encoder_ffn_embed_dim": ("mlp_hidden_size", 3072),
    "encoder_attention_heads": ("num_heads", 12), "embed_dim": ("patch_dim", 512),
    "input_patch_size": ("patch_size", -1), "conv_pos": ("pos_conv_kernel", 128),
    "conv_pos_groups": ("pos_conv_groups", 16), "deep_norm": ("deep_norm", False),
    "relative_position_embedding": ("relative_position", False),
    "gru_rel_pos": ("relative_position", False), "num_buckets": ("num_buckets", 320),
    "max_distance": ("max_distance", 1280), "layer_norm_first": (None, False),
}


def spelling(key: str, present: Container[str], prefix: str = "") -> str | None:
    """How a file holding the keys ``present`` (BEATs' under ``prefix``) spells ``key``: itself
    or one of its :data:`ALIASES`; None where it has none of them."""
    plain = key.removeprefix(prefix)
    return next((k for k in [key] + [prefix + a for a in ALIASES.get(plain, ())]
                 if k in present), None)


def is_audio(name: str) -> bool:
    return name.startswith("audio.")


def beats_keys(name: str) -> list[str]:
    """The BEATs tensors a single-rank audio-encoder parameter is made of."""
    if name in _TOP:
        return [_TOP[name]]
    match = _LAYER.match(name)
    if match and match.group(3) == "grep_a" and match.group(2) == "self_attention.core_attention":
        return [f"encoder.layers.{match.group(1)}.self_attn.grep_a"]
    if not match or match.group(2) not in _IN_LAYER:
        raise KeyError(f"{name} is not an audio-encoder parameter")
    layer, module, kind = match.groups()
    return [f"encoder.layers.{layer}.{part}.{kind}" for part in _IN_LAYER[module]]


def to_megatron(name: str, tensors: list[Tensor], audio: AudioConfig) -> Tensor:
    """BEATs tensors (in :func:`beats_keys` order) -> the single-rank parameter."""
    if len(tensors) > 1:
        return interleave(tensors, audio.num_heads)
    tensor = tensors[0]
    if name == _G and tensor.shape[0] != 1:  # a plain weight: its norm over all but the kernel
        return tensor.norm(dim=(0, 1), keepdim=True)
    return tensor


def to_beats(name: str, tensor: Tensor, audio: AudioConfig) -> dict[str, Tensor]:
    """The inverse of :func:`to_megatron` (the shared table under every layer's key)."""
    keys = beats_keys(name)
    if len(keys) > 1:
        return dict(zip(keys, split_heads(tensor, audio.num_heads, len(keys)), strict=True))
    if name == "audio.relative_attention_bias":
        return {keys[0].replace("layers.0.", f"layers.{i}."): tensor.contiguous()
                for i in range(audio.num_layers)}
    return {keys[0]: tensor.contiguous()}


def cfg_differences(cfg: dict, audio: AudioConfig) -> list[str]:
    """``field file != config`` for every BEATsConfig field of a file's ``cfg`` that the model
    config disagrees with (fields the file leaves out take BEATs' defaults)."""
    out = []
    for key, (ours, default) in CFG_FIELDS.items():
        theirs = cfg.get(key, default)
        mine = getattr(audio, ours) if ours else default
        if theirs != mine:
            where = f"model.audio.{ours}" if ours else "MegaVideo's post-norm layers"
            out.append(f"{key} {theirs!r} != {where} {mine!r}")
    return out


__all__ = ["ALIASES", "beats_keys", "cfg_differences", "is_audio", "spelling", "to_beats",
           "to_megatron"]
