"""BLIP-2's QFormer as VideoChat2 uses it: learned queries reading the video encoder's tokens.

    video tokens [n, B, C] (penultimate ViT layer) -> LayerNorm                    (memory)
    queries [Q, H] (32 learned, N(0, 0.02), then 64 extra, zero at first, as VideoChat2 adds
    them) ; text ids [L] -> word + position embeddings        (the text: optional)
    [queries ; text] -> LayerNorm -> N post-norm BERT layers:
        self-attention over queries and text (the mask says who sees whom)
        every k-th layer from the first: cross-attention to the memory, queries only
        an FFN each: the queries' own (``intermediate_query``), BERT's for the text
    -> the queries' outputs [Q, B, H] (stage 3: a Linear into the LLM's width [Q, B, H_llm])

Who sees whom (:func:`joint_mask`): queries and text all see each other (matching, and
VideoChat2's instruction read with the queries, ``model.qformer.text_input``), or the queries see
only themselves and the text sees the queries and the text before it (captioning). Text alone is
BERT on the caption. The layers are megatron-core TransformerLayers (the post-norm spec),
tensor-parallel over the video encoder's group, with BERT's dropout (``model.qformer.dropout``)
and stochastic depth rising linearly to ``model.qformer.drop_path`` (VideoChat2's 0.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from kernels.norms import LayerNorm
from megavideo.config import QFormerConfig, padded_vocab
from megavideo.models.encoders import EncoderLayers, PostNormLayer
from megavideo.models.init import init_normal, init_with, normal_linear
from megavideo.models.specs import ViTTransformerConfig, cross_attention_mask


def joint_mask(queries: int, text_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The self-attention mask [B, 1, Q + L, Q + L] (True: may not attend) of ``queries``
    queries followed by text with ``text_mask`` [B, L] (True on real tokens): every real token
    visible to all, or (``causal``) queries seeing queries only and each text token the queries
    and the text up to itself."""
    b, length = text_mask.shape
    present = torch.cat([text_mask.new_ones(b, queries), text_mask], dim=1).bool()  # [B, S]
    seen = present[:, None, :].expand(-1, queries + length, -1).clone()  # [B, S, S]
    if causal:
        seen[:, :queries, queries:] = False
        seen[:, queries:, queries:] &= torch.ones(length, length, dtype=torch.bool,
                                                  device=seen.device).tril()
    return ~seen[:, None]


class QFormerLayer(PostNormLayer):
    """A QFormer layer (see the module docstring); ``text_ffn``: it has BERT's FFN for text."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, *, text_ffn: bool = False,
                 drop_path: float = 0.0) -> None:
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection,
                         vp_stage)
        self.drop_path = drop_path
        self.text_mlp = self.text_mlp_norm = None
        if text_ffn:
            self.text_mlp = build_module(submodules.mlp, config=self.config,
                                         tp_group=self.tp_group)
            self.text_mlp_norm = build_module(submodules.pre_mlp_layernorm, config=self.config,
                                              hidden_size=self.config.hidden_size,
                                              eps=self.config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                attention_bias=None, query_length=None, **_unused):
        """hidden_states [Q + L, B, H]: the first ``query_length`` tokens the queries (None:
        all of them)."""
        q = hidden_states.shape[0] if query_length is None else query_length
        attn = self.self_attention(hidden_states, attention_mask=attention_mask)
        x = self.input_layernorm(self._add(hidden_states, attn, 1.0))
        queries, text = x[:q], x[q:]
        if q:
            if context is not None and self.crosses:
                cross = self.cross_attention(queries, key_value_states=context,
                                             attention_mask=cross_attention_mask(context_mask, q))
                queries = self.pre_cross_attn_layernorm(self._add(queries, cross, 1.0))
            queries = self.pre_mlp_layernorm(self._add(queries, self.mlp(queries), 1.0))
        if text.shape[0]:
            text = self.text_mlp_norm(self._add(text, self.text_mlp(text), 1.0))
        return torch.cat([queries, text]) if q and text.shape[0] else (queries if q else text)


class QFormer(MegatronModule):
    """See the module docstring; ``video_width`` is C, ``llm_width`` H_llm (0: no projection,
    the align sub-stage), ``vocab_size`` the text's tokenizer (0: no text)."""

    def __init__(self, qformer: QFormerConfig, config: ViTTransformerConfig, video_width: int,
                 llm_width: int = 0, pg_collection=None, vocab_size: int = 0) -> None:
        super().__init__(config=config)
        h, n = qformer.hidden_size, qformer.num_layers
        self.video_norm = LayerNorm(config, video_width, qformer.norm_eps)
        self.queries = nn.Parameter(torch.empty(qformer.num_queries, 1, h, dtype=config.params_dtype))
        init_with(self.queries, init_normal)
        self.queries.no_weight_decay = True
        self.extra_queries = None
        if qformer.extra_queries:
            self.extra_queries = nn.Parameter(torch.zeros(qformer.extra_queries, 1, h,
                                                          dtype=config.params_dtype))
            self.extra_queries.no_weight_decay = True
        self.vocab_size = vocab_size
        if vocab_size:
            self.word_embeddings = VocabParallelEmbedding(
                padded_vocab(vocab_size), h, init_method=config.init_method, config=config,
                tp_group=getattr(pg_collection, "tp", None))
            self.position_embeddings = nn.Embedding(qformer.max_positions, h,
                                                    dtype=config.params_dtype)
            init_with(self.position_embeddings.weight, init_normal)
        self.embed_norm = LayerNorm(config, h, qformer.norm_eps)
        drop = [qformer.drop_path * i / max(n - 1, 1) for i in range(n)]  # linspace(0, p, n)
        self.layers = EncoderLayers(
            qformer, config, range(0, n, qformer.cross_attention_every), video_width,
            pg_collection, arbitrary=bool(vocab_size), layer=QFormerLayer,
            params=[{"text_ffn": bool(vocab_size), "drop_path": p} for p in drop])
        self.proj = normal_linear(h, llm_width, config.params_dtype) if llm_width else None

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0] + (0 if self.extra_queries is None else
                                        self.extra_queries.shape[0])

    def embed(self, batch: int, ids: torch.Tensor | None = None, with_queries: bool = True
              ) -> torch.Tensor:
        """[queries ; text] [Q + L, B, H] after the embedding LayerNorm and dropout; ids [B, L]
        (None: the queries alone; ``with_queries`` False: the text alone)."""
        parts = []
        if with_queries:
            queries = self.queries if self.extra_queries is None else \
                torch.cat([self.queries, self.extra_queries])  # [Q, 1, H]
            parts.append(queries.expand(-1, batch, -1))
        if ids is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            text = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
            parts.append(text.transpose(0, 1).to(self.queries.dtype))
        x = self.embed_norm(torch.cat(parts) if len(parts) > 1 else parts[0])
        if self.config.hidden_dropout:
            x = F.dropout(x, self.config.hidden_dropout, self.training)
        return x

    def run(self, x: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor | None,
            queries: int) -> torch.Tensor:
        """The layers on embedded tokens x [Q + L, B, H] whose first ``queries`` are queries;
        memory [n, B, C] after :attr:`video_norm` (None: no cross-attention, text alone)."""
        return self.layers(x, mask, context=memory, query_length=queries)

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BERT on text alone: ids, mask [B, L] -> [L, B, H]."""
        return self.run(self.embed(ids.shape[0], ids, with_queries=False),
                        joint_mask(0, mask), None, 0)

    def forward(self, video: torch.Tensor, ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """video [n, B, C] -> the queries' outputs [Q, B, H_llm] (H without a projection);
        ids, mask [B, L]: text read with the queries (the instruction, ``text_input``)."""
        q, b = self.num_queries, video.shape[1]
        x = self.embed(b, ids)
        attn_mask = None
        if self.vocab_size:  # the layers take a full mask: the queries' own without text
            attn_mask = joint_mask(q, mask if ids is not None else
                                   torch.ones(b, 0, dtype=torch.bool, device=video.device))
        out = self.run(x, attn_mask, self.video_norm(video), q)[:q]
        return out if self.proj is None else self.proj(out)
