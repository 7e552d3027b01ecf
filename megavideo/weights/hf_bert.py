"""BERT weights in the Hugging Face layout <-> the stage-2 text encoder and its MLM head.

Hugging Face keys (``BertForMaskedLM``; official InternVideo2 files add ``text_encoder.``)::

    bert.embeddings.{word,position,token_type}_embeddings   text.{word,position,token_type}_embeddings
    bert.embeddings.LayerNorm                       text.embed_norm
    bert.encoder.layer.<i>.attention.self.{query,key,value}  text.layers.layers.<i>.self_attention.linear_qkv
    bert.encoder.layer.<i>.attention.output.dense   ... self_attention.linear_proj
    bert.encoder.layer.<i>.attention.output.LayerNorm  ... input_layernorm
    bert.encoder.layer.<i>.crossattention.self.query   ... cross_attention.linear_q
    bert.encoder.layer.<i>.crossattention.self.{key,value}  ... cross_attention.linear_kv
    bert.encoder.layer.<i>.crossattention.output.dense   ... cross_attention.linear_proj
    bert.encoder.layer.<i>.crossattention.output.LayerNorm  ... pre_cross_attn_layernorm
    bert.encoder.layer.<i>.intermediate.dense       ... mlp.linear_fc1
    bert.encoder.layer.<i>.output.dense             ... mlp.linear_fc2
    bert.encoder.layer.<i>.output.LayerNorm         ... pre_mlp_layernorm
    cls.predictions.transform.{dense,LayerNorm}     mlm_head.{dense,norm}
    cls.predictions.bias                            mlm_head.decoder.bias (the decoder weight is tied
                                                    to the word embeddings)

megatron-core fuses q, k and v per head (head, q|k|v, dim) and the cross-attention's k and v
likewise; the vocabulary rows are padded with zeros to :func:`megavideo.config.padded_vocab`.
Checkpoints converted from TensorFlow name LayerNorm parameters ``gamma``/``beta``; both are read.
The pooler and the next-sentence head are not part of the model and are not read.
"""

from __future__ import annotations

import re

import torch

from megavideo.config import TextConfig, padded_vocab

Tensor = torch.Tensor
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
_LAYER = re.compile(r"^text\.layers\.layers\.(\d+)\.(.+)\.(weight|bias)$")
IN_LAYER = {
    "self_attention.linear_qkv": ("attention.self.query", "attention.self.key",
                                  "attention.self.value"),
    "self_attention.linear_proj": ("attention.output.dense",),
    "input_layernorm": ("attention.output.LayerNorm",),
    "cross_attention.linear_q": ("crossattention.self.query",),
    "cross_attention.linear_kv": ("crossattention.self.key", "crossattention.self.value"),
    "cross_attention.linear_proj": ("crossattention.output.dense",),
    "pre_cross_attn_layernorm": ("crossattention.output.LayerNorm",),
    "mlp.linear_fc1": ("intermediate.dense",),
    "mlp.linear_fc2": ("output.dense",),
    "pre_mlp_layernorm": ("output.LayerNorm",),
}
_TOP = {
    "text.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "text.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "text.token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "text.embed_norm.weight": "bert.embeddings.LayerNorm.weight",
    "text.embed_norm.bias": "bert.embeddings.LayerNorm.bias",
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_head.decoder.bias": "cls.predictions.bias",
}
_VOCAB_ROWS = ("text.word_embeddings.weight", "mlm_head.decoder.bias")


def is_text(name: str) -> bool:
    """Whether a stage-2 parameter belongs to the text encoder or its MLM head."""
    return name.startswith(("text.", "mlm_head."))


def is_cross_attention(name: str) -> bool:
    """The fusion layers' cross-attention, which bert-large-uncased does not have."""
    return ".cross_attention." in name or ".pre_cross_attn_layernorm." in name


def hf_keys(name: str) -> list[str]:
    """The Hugging Face tensors a single-rank text-encoder parameter is made of."""
    if name in _TOP:
        return [_TOP[name]]
    match = _LAYER.match(name)
    if not match or match.group(2) not in IN_LAYER:
        raise KeyError(f"{name} is not a text-encoder parameter")
    layer, module, kind = match.groups()
    return [f"bert.encoder.layer.{layer}.{part}.{kind}" for part in IN_LAYER[module]]


def interleave(parts: list[Tensor], heads: int) -> Tensor:
    """[q; k; v] (or [k; v]) rows of ``heads`` heads -> megatron-core's (head, part, dim) rows."""
    rest = parts[0].shape[1:]
    return torch.stack([p.reshape(heads, -1, *rest) for p in parts], dim=1).reshape(-1, *rest)


def split_heads(fused: Tensor, heads: int, parts: int) -> list[Tensor]:
    rest = fused.shape[1:]
    return list(fused.reshape(heads, parts, -1, *rest).transpose(0, 1).reshape(parts, -1, *rest))


def to_megatron(name: str, tensors: list[Tensor], text: TextConfig, vocab: int) -> Tensor:
    """Hugging Face tensors (in :func:`hf_keys` order) -> the single-rank parameter."""
    if len(tensors) > 1:
        return interleave(tensors, text.num_heads)
    tensor = tensors[0]
    if name in _VOCAB_ROWS:
        if tensor.shape[0] != vocab:
            raise ValueError(f"{name} has {tensor.shape[0]} vocabulary rows but the tokenizer "
                             f"(model.text.vocab_file) has {vocab} tokens")
        padding = tensor.new_zeros(padded_vocab(vocab) - vocab, *tensor.shape[1:])
        return torch.cat([tensor, padding])
    return tensor


def to_hf(name: str, tensor: Tensor, text: TextConfig, vocab: int) -> dict[str, Tensor]:
    """The inverse of :func:`to_megatron`."""
    keys = hf_keys(name)
    if len(keys) > 1:
        parts = split_heads(tensor, text.num_heads, len(keys))
    else:
        parts = [tensor[:vocab] if name in _VOCAB_ROWS else tensor]
    return {key: part.contiguous() for key, part in zip(keys, parts, strict=True)}


def legacy_name(key: str) -> str:
    """TensorFlow-converted BERT files name LayerNorm's weight and bias ``gamma`` and ``beta``."""
    if ".LayerNorm." not in key:
        return key
    return key.removesuffix(".weight") + ".gamma" if key.endswith(".weight") else \
        key.removesuffix(".bias") + ".beta"


def source_prefix(keys: set[str]) -> str | None:
    """What a file puts before ``bert.`` and ``cls.`` (``""`` for Hugging Face's BertForMaskedLM,
    ``text_encoder.`` for InternVideo2's), or None when it holds no BERT with an MLM head."""
    found = sorted(k.removesuffix(WORD_EMBEDDINGS) for k in keys
                   if k.endswith("bert." + WORD_EMBEDDINGS))
    if not found:
        return None
    return found[0].removesuffix("bert.")


__all__ = ["IN_LAYER", "hf_keys", "interleave", "is_cross_attention", "is_text", "legacy_name",
           "source_prefix", "split_heads", "to_hf", "to_megatron"]
