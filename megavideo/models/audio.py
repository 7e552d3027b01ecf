"""The stage-2 audio encoder: BEATs on a clip's log-mel filterbank.

    fbank [B, F, mel] -> 16x16 patches (Conv2d) -> LayerNorm -> Linear to the width
    -> + convolutional position embedding (grouped Conv1d, weight norm, GELU) -> LayerNorm
    -> post-norm DeepNorm layers -> tokens [N, B, H]

BEATs' gated relative position bias is not modelled (see the stage-2 docs). The layers are
tensor-parallel over the TP group; the patch and position convolutions are replicated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from kernels.norms import LayerNorm
from megavideo.config import AudioConfig
from megavideo.models.encoders import EncoderLayers
from megavideo.models.specs import ViTTransformerConfig


def deep_norm_alpha(layers: int) -> float:
    return (2.0 * layers) ** 0.25


class AudioEncoder(MegatronModule):
    """BEATs-shaped encoder (see the module docstring)."""

    def __init__(self, audio: AudioConfig, config: ViTTransformerConfig) -> None:
        super().__init__(config=config)
        dtype, h = config.params_dtype, audio.hidden_size
        p = audio.patch_size
        self.patch_embed = nn.Conv2d(1, audio.patch_dim, kernel_size=p, stride=p, bias=False,
                                     dtype=dtype)
        self.patch_norm = LayerNorm(config, audio.patch_dim, audio.norm_eps)
        self.post_extract_proj = nn.Linear(audio.patch_dim, h, dtype=dtype)
        k = audio.pos_conv_kernel
        conv = nn.Conv1d(h, h, kernel_size=k, padding=k // 2, groups=audio.pos_conv_groups,
                         dtype=dtype)
        self.pos_conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.reset_seeded()
        self.trim = 1 if k % 2 == 0 else 0  # BEATs' SamePad
        self.norm = LayerNorm(config, h, audio.norm_eps)
        self.layers = EncoderLayers(audio, config)

    def reset_seeded(self) -> None:
        """BEATs' positional convolution: weight ~ N(0, 4 / (kernel x width)), zero bias, and the
        weight norm's magnitude that of the drawn weight (see :mod:`megavideo.models.init`)."""
        conv = self.pos_conv
        weight = torch.empty_like(conv.weight)
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4.0 / weight.shape[2] / weight.shape[0]))
        conv.weight = weight  # weight norm's right inverse: magnitude and direction from it
        nn.init.zeros_(conv.bias)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [B, F, mel] -> tokens [N, B, H] (N = F/16 x mel/16, time-major)."""
        x = self.patch_embed(fbank[:, None].to(self.patch_embed.weight.dtype))  # [B, C, F', M']
        x = self.post_extract_proj(self.patch_norm(x.flatten(2).transpose(1, 2)))  # [B, N, H]
        pos = self.pos_conv(x.transpose(1, 2))
        if self.trim:
            pos = pos[..., :-self.trim]
        x = self.norm(x + F.gelu(pos).transpose(1, 2))
        return self.layers(x.transpose(0, 1).contiguous(), None)
