"""The stage-3 QFormer's weights from BERT in the Hugging Face layout (``bert-base-uncased``, as
VideoChat2 starts its QFormer) or from a released VideoChat2 / InternVideo2-Chat checkpoint.

    file (``<bert>`` = ``bert.``, ``""`` or ``qformer.bert.``)   QFormer parameter
    <bert>embeddings.LayerNorm                      qformer.embed_norm
    <bert>encoder.layer.<i>.attention.*, crossattention.*   qformer.layers.layers.<i>.* as in
                                                    :mod:`megavideo.weights.hf_bert`
    <bert>encoder.layer.<i>.intermediate_query.dense  ... mlp.linear_fc1   (the queries' own
    <bert>encoder.layer.<i>.output_query.{dense,LayerNorm}  ... mlp.linear_fc2, pre_mlp_layernorm
                                                    FFN; BERT's intermediate/output where the file
                                                    has none, as VideoChat2 copies them)
    query_tokens [1, 32, H], extra_query_tokens [1, 64, H]   qformer.queries, qformer.extra_queries
    vision_layernorm                                qformer.video_norm
    mistral_proj (VideoChat2), project_up (InternVideo2-Chat)   qformer.proj
    with text (model.qformer.vocab_file):
    <bert>embeddings.{word,position}_embeddings     qformer.{word,position}_embeddings (a file
                                                    without the [DEC] row: it is drawn N(0, 0.02))
    <bert>encoder.layer.<i>.intermediate.dense      ... text_mlp.linear_fc1    (BERT's FFN,
    <bert>encoder.layer.<i>.output.{dense,LayerNorm}  ... text_mlp.linear_fc2, text_mlp_norm   the text's)

What the file lacks keeps its initialisation: from bert-base that is the cross-attention (a fresh
BERT layer's init), the queries (32 N(0, 0.02), 64 zeros), the video LayerNorm and the projection.
A QFormer without text reads neither BERT's embeddings nor its text FFN.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

from megavideo.config import QFormerConfig, Stage3ModelConfig, padded_vocab
from megavideo.weights.hf_bert import IN_LAYER, interleave, is_cross_attention, legacy_name

Tensor = torch.Tensor
_LAYER = re.compile(r"^qformer\.layers\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QUERY_FFN = {"intermediate.dense": "intermediate_query.dense", "output.dense": "output_query.dense",
              "output.LayerNorm": "output_query.LayerNorm"}
_TEXT_FFN = {"text_mlp.linear_fc1": "intermediate.dense", "text_mlp.linear_fc2": "output.dense",
             "text_mlp_norm": "output.LayerNorm"}
_EMBEDDINGS = ("word_embeddings", "position_embeddings")
_EMBED_NORM = "embeddings.LayerNorm.weight"
PROJECTIONS = ("mistral_proj", "project_up")


def bert_prefix(keys: Collection[str]) -> str | None:
    """What the file puts before BERT's ``embeddings.``/``encoder.`` keys (None: no BERT)."""
    found = sorted((k.removesuffix(norm) for norm in (_EMBED_NORM, legacy_name(_EMBED_NORM))
                    for k in keys if k.endswith(norm)), key=len)
    return found[0] if found else None


class QFormerKeys:
    """The file's keys of each QFormer parameter (:func:`sources`), for the file's ``keys``."""

    def __init__(self, keys: Collection[str]) -> None:
        prefix = bert_prefix(keys)
        if prefix is None:
            raise ValueError(f"it has no {_EMBED_NORM} (no BERT)")
        self.prefix, self.keys = prefix, set(keys)
        self.outer = prefix.removesuffix("bert.").removesuffix("qformer.")
        self.query_ffn = any("_query." in k for k in keys)
        self.crosses = any(".crossattention." in k for k in keys)
        self.proj = next((p for p in PROJECTIONS if f"{self.outer}{p}.weight" in keys), None)

    def sources(self, name: str) -> list[str] | None:
        """The file's keys of a single-rank QFormer parameter, None where the file has none."""
        kind = name.rsplit(".", 1)[-1]
        outer = self.outer
        top = {"qformer.queries": f"{outer}query_tokens",
               "qformer.extra_queries": f"{outer}extra_query_tokens",
               "qformer.video_norm.weight": f"{outer}vision_layernorm.weight",
               "qformer.video_norm.bias": f"{outer}vision_layernorm.bias",
               "qformer.embed_norm.weight": f"{self.prefix}embeddings.LayerNorm.weight",
               "qformer.embed_norm.bias": f"{self.prefix}embeddings.LayerNorm.bias"}
        if self.proj:
            top[f"qformer.proj.{kind}"] = f"{outer}{self.proj}.{kind}"
        for table in _EMBEDDINGS:
            top[f"qformer.{table}.weight"] = f"{self.prefix}embeddings.{table}.weight"
        if name in top:
            key = top[name]
            return [key] if key in self.keys or legacy_name(key) in self.keys else None
        match = _LAYER.match(name)
        if match and match.group(2) in _TEXT_FFN:
            layer, module, kind = match.groups()
            return [f"{self.prefix}encoder.layer.{layer}.{_TEXT_FFN[module]}.{kind}"]
        if not match or match.group(2) not in IN_LAYER or \
                (is_cross_attention(name) and not self.crosses):
            return None
        layer, module, kind = match.groups()
        parts = [(_QUERY_FFN.get(p, p) if self.query_ffn else p) for p in IN_LAYER[module]]
        return [f"{self.prefix}encoder.layer.{layer}.{p}.{kind}" for p in parts]


def text_vocab(model: Stage3ModelConfig) -> int:
    """The QFormer's text vocabulary with [DEC] (0: it reads no text; it does in the align
    sub-stage and with model.qformer.text_input)."""
    from dataloaders.tokenizer import QFormerText

    texts = model.substage == "align" or model.qformer.text_input
    return len(QFormerText(model.qformer.vocab_file)) if texts else 0


def to_megatron(name: str, tensors: list[Tensor], qformer: QFormerConfig, vocab: int = 0
                ) -> Tensor:
    """The file's tensors (in :meth:`QFormerKeys.sources` order) -> the single-rank parameter;
    ``vocab``: the text's tokenizer with [DEC]."""
    if len(tensors) > 1:  # q, k, v (or k, v) fused per head
        return interleave(tensors, qformer.num_heads)
    if name in ("qformer.queries", "qformer.extra_queries"):
        return tensors[0].transpose(0, 1)  # [1, Q, H] -> [Q, 1, H]
    if name == "qformer.word_embeddings.weight":
        return _vocab_rows(tensors[0], vocab)
    return tensors[0]


def _vocab_rows(table: Tensor, vocab: int) -> Tensor:
    """BERT's word embeddings [R, H] as the QFormer's [padded_vocab(vocab), H]: R = vocab, or
    vocab - 1 (bert-base-uncased: the [DEC] row VideoChat2 adds drawn N(0, 0.02), as Hugging
    Face's ``resize_token_embeddings`` drew it), the padding rows zero."""
    rows = table.shape[0]
    if rows not in (vocab, vocab - 1):
        raise ValueError(f"its word embeddings have {rows} rows but the tokenizer "
                         f"(model.qformer.vocab_file) with [DEC] has {vocab} tokens")
    dec = torch.empty(vocab - rows, table.shape[1]).normal_(0.0, 0.02,
                                                            generator=torch.Generator().manual_seed(0))
    padding = table.new_zeros(padded_vocab(vocab) - vocab, table.shape[1])
    return torch.cat([table, dec.to(table.dtype), padding])


__all__ = ["PROJECTIONS", "QFormerKeys", "bert_prefix", "text_vocab", "to_megatron"]
