"""Core attention for megatron-core's local spec: fused kernels instead of the whole score matrix.

``train.attention`` picks the kernel; it is megatron-core's ``TransformerConfig.attention_backend``
(the Transformer Engine spec hands it to TE, which picks among its own kernels):

==========  ===============================  =====================================================
train.      attention_backend                local spec (this module)
attention
==========  ===============================  =====================================================
auto        AttnBackend.auto                 flash-attn where installed on a GPU, else SDPA
sdpa        AttnBackend.fused                ``F.scaled_dot_product_attention``: flash, cuDNN or
                                             memory-efficient kernels on a GPU, the CPU's flash
                                             kernel on the CPU
flash       AttnBackend.flash                the flash-attn package (SDPA where a padding mask
                                             is given: flash-attn takes none)
unfused     AttnBackend.unfused              megatron-core's DotProductAttention: the whole
                                             [b, heads, s, s] score matrix and softmax
==========  ===============================  =====================================================

Every kernel takes megatron-core's core-attention call: q [sq, b, heads, d], k and v
[sk, b, groups, d], a boolean mask (True: masked out) broadcast to [b, heads, sq, sk] or None, and
returns [sq, b, heads * d]. A causal mask type means the causal triangle whatever mask is given,
as Transformer Engine reads it. SDPA (and flash-attn's fallback to it) also takes an additive
float ``attention_bias`` broadcast to [b, heads, sq, sk], added to the scaled scores (BEATs'
relative positions, :mod:`megavideo.models.audio`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels.backends import detect

log = logging.getLogger(__name__)

ATTENTION = {"auto": AttnBackend.auto, "sdpa": AttnBackend.fused, "flash": AttnBackend.flash,
             "unfused": AttnBackend.unfused}  # train.attention -> megatron-core's backend


class SDPAttention(MegatronModule):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1 or config.softmax_type != "vanilla" \
                or config.window_size is not None or config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention runs vanilla softmax attention without context "
                             "parallelism, windows or query-key layer scaling.")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPAttention takes no packed sequences.")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        mask = None if causal else attention_mask
        if mask is None and attention_bias is None:
            context = self._unmasked(query, key, value, causal)
            if context is not None:
                return context
        return self._sdpa(query, key, value, mask, causal, attention_bias)

    def _unmasked(self, query, key, value, causal: bool) -> torch.Tensor | None:
        """A kernel for attention without a padding mask, or None for SDPA's."""
        return None

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def _sdpa(self, query, key, value, mask, causal: bool, bias=None) -> torch.Tensor:
        sq, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if self.groups < self.heads:
            k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
        attn_mask = None if mask is None else ~mask
        if bias is not None:  # added to the scaled scores; -inf where masked out
            attn_mask = bias.to(q.dtype) if mask is None else \
                bias.to(q.dtype).masked_fill(mask, float("-inf"))
        with dropout_rng(self._dropout(), self.config.sequence_parallel):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self._dropout(),
                is_causal=causal, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, heads * d]


class FlashAttention(SDPAttention):
    """Core attention on the flash-attn package where no padding mask is given (fp16/bf16 on a
    GPU); SDPA otherwise."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from flash_attn import flash_attn_func

        self._flash = flash_attn_func

    def _unmasked(self, query, key, value, causal: bool) -> torch.Tensor | None:
        if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
            return None
        sq, b = query.shape[:2]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, d]; GQA native
        with dropout_rng(self._dropout(), self.config.sequence_parallel):
            out = self._flash(q, k, v, dropout_p=self._dropout(), softmax_scale=self.softmax_scale,
                              causal=causal)
        return out.transpose(0, 1).reshape(sq, b, -1)


def dropout_rng(p: float, sequence_parallel: bool):
    """megatron-core's model-parallel RNG for attention dropout on TP-split heads (as its
    DotProductAttention forks it), nothing to fork without dropout."""
    if p and not sequence_parallel:
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


def attention_kernel(backend: AttnBackend) -> str:
    """The local spec's kernel for megatron-core's ``attention_backend``: ``flash``, ``sdpa`` or
    ``unfused`` (logged once per answer)."""
    if backend in (AttnBackend.unfused, AttnBackend.local):
        name = "unfused"
    elif backend == AttnBackend.flash:
        name = "flash"
    elif backend == AttnBackend.auto and detect().flash_attn and torch.cuda.is_available():
        name = "flash"
    else:
        name = "sdpa"
    _log_kernel(name)
    return name


@functools.cache
def _log_kernel(name: str) -> None:
    what = {"flash": "the flash-attn package (SDPA where a padding mask is given)",
            "sdpa": "torch.nn.functional.scaled_dot_product_attention",
            "unfused": "megatron-core's DotProductAttention (the whole score matrix)"}[name]
    log.info("core attention (local spec): %s", what)


def core_attention(backend: AttnBackend) -> type:
    """The local spec's core-attention module for megatron-core's ``attention_backend``."""
    return {"flash": FlashAttention, "sdpa": SDPAttention,
            "unfused": DotProductAttention}[attention_kernel(backend)]
