"""Stage 3's bridge from the video encoder to the LLM: BLIP-2's QFormer as VideoChat2 uses it.

    video tokens [n, B, C] (penultimate ViT layer) -> LayerNorm                    (memory)
    queries [Q, H] (32 learned, N(0, 0.02), then 64 extra, zero at first, as VideoChat2 adds
    them) -> LayerNorm -> N post-norm BERT layers, every k-th from the first cross-attending to
    the memory -> Linear into the LLM's width                                      [Q, B, H_llm]

Its layers are megatron-core TransformerLayers (the stage-2 text encoder's post-norm spec),
tensor-parallel over the video encoder's group, with BERT's dropout (``model.qformer.dropout``).
The queries take no text: VideoChat2's optional instruction input to the QFormer is not modelled.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn

from kernels.norms import LayerNorm
from megavideo.config import QFormerConfig
from megavideo.models.encoders import EncoderLayers
from megavideo.models.init import init_normal, init_with, normal_linear
from megavideo.models.specs import ViTTransformerConfig


class QFormer(MegatronModule):
    """See the module docstring; ``video_width`` is C, ``llm_width`` H_llm."""

    def __init__(self, qformer: QFormerConfig, config: ViTTransformerConfig, video_width: int,
                 llm_width: int, pg_collection=None) -> None:
        super().__init__(config=config)
        h = qformer.hidden_size
        self.video_norm = LayerNorm(config, video_width, qformer.norm_eps)
        self.queries = nn.Parameter(torch.empty(qformer.num_queries, 1, h, dtype=config.params_dtype))
        init_with(self.queries, init_normal)
        self.queries.no_weight_decay = True
        self.extra_queries = None
        if qformer.extra_queries:
            self.extra_queries = nn.Parameter(torch.zeros(qformer.extra_queries, 1, h,
                                                          dtype=config.params_dtype))
            self.extra_queries.no_weight_decay = True
        self.embed_norm = LayerNorm(config, h, qformer.norm_eps)
        cross = range(0, qformer.num_layers, qformer.cross_attention_every)
        self.layers = EncoderLayers(qformer, config, cross, video_width, pg_collection)
        self.proj = normal_linear(h, llm_width, config.params_dtype)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [n, B, C] -> [Q, B, H_llm]."""
        memory = self.video_norm(video)
        queries = self.queries if self.extra_queries is None else \
            torch.cat([self.queries, self.extra_queries])  # [Q, 1, H]
        x = self.embed_norm(queries.expand(-1, video.shape[1], -1))
        return self.proj(self.layers(x, None, context=memory))
