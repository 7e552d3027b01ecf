"""The video ViT as megatron-core modules: embedding plus a stack of InternVideo2 blocks."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from torch import nn

from kernels.norms import NORMS
from megavideo.config import ViTConfig
from megavideo.models.embedding import VideoEmbedding
from megavideo.models.layers import BlockStack
from megavideo.models.specs import ViTTransformerConfig, mask_type, vit_layer_spec


def block_stack(
    vit: ViTConfig,
    config: ViTTransformerConfig,
    num_layers: int,
    *,
    padded: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
) -> BlockStack:
    """``num_layers`` InternVideo2 blocks (the ones this rank holds), with the final norm if any;
    ``pg_collection`` gives them other process groups than megatron-core's (stage 3)."""
    tp_group = pg_collection.tp if pg_collection is not None else None
    submodules = TransformerBlockSubmodules(
        layer_specs=[vit_layer_spec(vit, config, mask_type(padded), tp_group)] * num_layers,
        layer_norm=NORMS[vit.norm] if vit.final_norm else None,
    )
    return BlockStack(config, submodules, post_layer_norm=vit.final_norm,
                      pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                      pg_collection=pg_collection)


class VisionTransformer(nn.Module):
    """A whole (not pipelined) ViT: the teachers. Returns the last hidden state and the taps."""

    def __init__(self, vit: ViTConfig, config: ViTTransformerConfig, pg_collection=None) -> None:
        super().__init__()
        self.embed = VideoEmbedding(vit, config.params_dtype)
        self.blocks = block_stack(vit, config, vit.num_layers, pg_collection=pg_collection)

    def forward(self, video: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict]:
        x = self.embed(video).transpose(0, 1).contiguous()  # [N, B, C]
        return self.blocks(x, None, None, taps)
