"""The video encoder (InternVideo2's ViT), one pipeline chunk at a time; every stage builds on it.

    first chunk   video -> tubelets + CLS + pos_embed -> keep the visible tokens -> pad -> SP split
    every chunk   its blocks (the raw residual stream of chosen layers handed back)
    last chunk    the attention pool over the whole, unpadded sequence: [B, pool_dim]

Parameter names (``embed.*``, ``blocks.layers.<i>.*``, ``pool.*``) are the same in every stage, so
a later stage loads the video encoder of an earlier one by name.
"""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megavideo.config import ModelConfig
from megavideo.models.embedding import Tokens, VideoEmbedding
from megavideo.models.heads import AttentionPool
from megavideo.models.specs import ViTTransformerConfig, without_sequence_parallel
from megavideo.models.vit import block_stack
from parallel.comm import from_sequence_parallel, to_sequence_parallel
from parallel.layout import Chunk


class VideoChunk(MegatronModule):
    """One pipeline chunk of the video encoder (see the module docstring)."""

    def __init__(self, model: ModelConfig, config: ViTTransformerConfig, chunk: Chunk, tokens: Tokens,
                 tp_group, pg_collection=None, image_tokens: Tokens | None = None,
                 image_pos: str = "") -> None:
        super().__init__(config=config)
        student = model.student
        self.tokens = tokens
        self.image_tokens = image_tokens or tokens
        padded = any(t.length > t.real for t in (tokens, self.image_tokens))
        self.tp_group = tp_group
        self.pre_process, self.post_process = chunk.is_first, chunk.is_last
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.input_tensor = None
        if self.pre_process:
            self.embed = VideoEmbedding(student, config.params_dtype, image_pos)
            self.embed.pos_embed.no_weight_decay = True
            self.embed.cls_token.no_weight_decay = True
        vp_stage = chunk.vp_stage if config.virtual_pipeline_model_parallel_size else None
        self.padded = padded
        self.blocks = block_stack(student, config, chunk.num_layers, padded=padded,
                                  pre_process=self.pre_process, post_process=self.post_process,
                                  vp_stage=vp_stage, pg_collection=pg_collection)
        if self.post_process:
            self.pool = AttentionPool(without_sequence_parallel(config), student.hidden_size,
                                      student.pool_heads, student.pool_dim, model.aligner_norm_eps,
                                      tp_group)

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def tokens_of(self, image: bool) -> Tokens:
        """The token sequence of a video step or of an image step."""
        return self.image_tokens if image else self.tokens

    def _embed(self, video: torch.Tensor, visible: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        x = self.embed(video)  # [B, 1 + N, C]
        index = visible[:, :, None].expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, index).transpose(0, 1)  # tokens masked after pos_embed: [n, B, C]
        if tokens.length > tokens.real:
            pad = x.new_zeros(tokens.length - tokens.real, *x.shape[1:])
            x = torch.cat([x, pad])
        return to_sequence_parallel(x.contiguous(), self.tp_group, self.config.sequence_parallel)

    def full_sequence(self, hidden: torch.Tensor, image: bool = False) -> torch.Tensor:
        """The whole, unpadded sequence on every TP rank: [n, B, C]."""
        full = from_sequence_parallel(hidden, self.tp_group, self.config.sequence_parallel)
        return full[: self.tokens_of(image).real]

    def encode(self, video: torch.Tensor | None, visible: torch.Tensor | None,
               drop_u: torch.Tensor | None, taps=(), image: bool = False
               ) -> tuple[torch.Tensor, dict]:
        """This chunk's blocks on the embedded visible tokens (first chunk) or on the previous
        chunk's output (of an image step with ``image``); returns the hidden state
        [s(/tp), B, C] and the tapped layers' outputs."""
        tokens = self.tokens_of(image)
        hidden = self._embed(video, visible, tokens) if self.pre_process else self.input_tensor
        mask = tokens.attention_mask(hidden.shape[1], hidden.device, always=self.padded)
        return self.blocks(hidden, mask, drop_u, taps)
