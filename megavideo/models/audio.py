"""The stage-2 audio encoder: BEATs on a clip's log-mel filterbank.

    fbank [B, F, mel] -> 16x16 patches (Conv2d) -> LayerNorm -> Linear to the width
    -> + convolutional position embedding (grouped Conv1d, weight norm, GELU) -> LayerNorm
    -> post-norm DeepNorm layers with BEATs' gated relative position bias -> tokens [N, B, H]

The relative position bias (WavLM's) is one table [buckets, heads] shared by every layer, looked
up by the bucket of each (key - query) token offset (:func:`relative_buckets`). Each layer gates
it per query and head from its own queries (:class:`GatedRelativeAttention`):

    gate_a, gate_b = sigmoid(sum over 4 of grep_linear(q) as [2, 4])
    scores = q k^T / sqrt(d) + (gate_a (gate_b grep_a - 1) + 2) bias

The layers are tensor-parallel over the TP group (the table and ``grep_a`` split by heads, the
gate's linear replicated, its gradient summed over the group); the patch and position
convolutions are replicated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from torch import nn

from kernels.attention import SDPAttention, attention_kernel, dropout_rng
from kernels.norms import LayerNorm
from megavideo.config import AudioConfig
from megavideo.models.encoders import EncoderLayers
from megavideo.models.init import init_normal, init_with
from megavideo.models.specs import ViTTransformerConfig
from parallel.comm import group_size


def deep_norm_alpha(layers: int) -> float:
    return (2.0 * layers) ** 0.25


def relative_buckets(tokens: int, buckets: int, max_distance: int,
                     device: torch.device) -> torch.Tensor:
    """[tokens, tokens] bucket of each (key - query) offset: half the buckets per sign (positive
    offsets in the upper half), offsets below a quarter of the buckets exact, larger ones on a
    log scale up to ``max_distance``, beyond it the last bucket."""
    positions = torch.arange(tokens, device=device)
    offset = positions[None, :] - positions[:, None]
    half = buckets // 2
    exact = half // 2
    distance = offset.abs()
    log_scale = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_scale * (half - exact)).long()).clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, large)


class GatedRelativeAttention(SDPAttention):
    """Core attention adding BEATs' relative position bias, gated by this layer's queries (see the
    module docstring); megatron-core hands it the ungated bias [1, heads, s, s] as
    ``attention_bias``. SDPA runs it (flash-attn takes no bias), or with ``train.attention=
    unfused`` the whole score matrix, as megatron-core's unfused attention would."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        self.grep_linear = nn.Linear(config.kv_channels, 8, dtype=config.params_dtype)
        self.grep_a = nn.Parameter(torch.ones(1, self.heads, 1, 1, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.grep_a, True, 1, 1)
        self.unfused = attention_kernel(config.attention_backend) == "unfused"

    def _shared(self, tensor: torch.Tensor) -> torch.Tensor:
        """A replicated parameter used on this rank's heads only: its gradient summed over TP."""
        if group_size(self.tp_group) == 1:
            return tensor
        return copy_to_tensor_model_parallel_region(tensor, group=self.tp_group)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:  # query [s, b, heads, d]
            gates = F.linear(query, self._shared(self.grep_linear.weight),
                             self._shared(self.grep_linear.bias))  # [s, b, heads, 8]
            gate_a, gate_b = torch.sigmoid(gates.unflatten(-1, (2, 4)).sum(-1)).unbind(-1)
            gate = gate_a * (gate_b * self.grep_a.view(-1) - 1.0) + 2.0  # [s, b, heads]
            attention_bias = gate.permute(1, 2, 0)[..., None] * attention_bias  # [b, heads, s, s]
        if self.unfused:
            return self._scores_softmax(query, key, value, attention_mask, attention_bias)
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                               packed_seq_params)

    def _scores_softmax(self, query, key, value, mask, bias) -> torch.Tensor:
        """softmax(q k^T scale + bias) v with the whole [b, heads, s, s] score matrix."""
        sq, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        scores = q @ k.transpose(-1, -2) * self.softmax_scale
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        if self._dropout():
            with dropout_rng(self._dropout(), self.config.sequence_parallel):
                probs = F.dropout(probs, self._dropout())
        return (probs @ v).permute(2, 0, 1, 3).reshape(sq, b, -1)


class AudioEncoder(MegatronModule):
    """BEATs (see the module docstring)."""

    def __init__(self, audio: AudioConfig, config: ViTTransformerConfig, tp_group=None) -> None:
        super().__init__(config=config)
        dtype, h = config.params_dtype, audio.hidden_size
        p = audio.patch_size
        self.audio = audio
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
        self.relative_attention_bias = None
        if audio.relative_position:
            heads = config.num_attention_heads // group_size(tp_group)
            self.relative_attention_bias = nn.Parameter(
                torch.empty(audio.num_buckets, heads, dtype=dtype))
            set_tensor_model_parallel_attributes(self.relative_attention_bias, True, 1, 1)
            init_with(self.relative_attention_bias, init_normal)
        self.layers = EncoderLayers(audio, config, relative_bias=audio.relative_position)

    def reset_seeded(self) -> None:
        """BEATs' positional convolution: weight ~ N(0, 4 / (kernel x width)), zero bias, and the
        weight norm's magnitude that of the drawn weight (see :mod:`megavideo.models.init`)."""
        conv = self.pos_conv
        weight = torch.empty_like(conv.weight)
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4.0 / weight.shape[2] / weight.shape[0]))
        conv.weight = weight  # weight norm's right inverse: magnitude and direction from it
        nn.init.zeros_(conv.bias)

    def position_bias(self, tokens: int) -> torch.Tensor | None:
        """The ungated relative position bias [1, heads, tokens, tokens] (this rank's heads)."""
        if self.relative_attention_bias is None:
            return None
        buckets = relative_buckets(tokens, self.audio.num_buckets, self.audio.max_distance,
                                   self.relative_attention_bias.device)
        return self.relative_attention_bias[buckets].permute(2, 0, 1)[None]

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [B, F, mel] -> tokens [N, B, H] (N = F/16 x mel/16, time-major)."""
        x = self.patch_embed(fbank[:, None].to(self.patch_embed.weight.dtype))  # [B, C, F', M']
        x = self.post_extract_proj(self.patch_norm(x.flatten(2).transpose(1, 2)))  # [B, N, H]
        pos = self.pos_conv(x.transpose(1, 2))
        if self.trim:
            pos = pos[..., :-self.trim]
        x = self.norm(x + F.gelu(pos).transpose(1, 2))
        return self.layers(x.transpose(0, 1).contiguous(), None,
                           attention_bias=self.position_bias(x.shape[1]))
