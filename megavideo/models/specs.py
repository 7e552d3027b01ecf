"""megatron-core TransformerConfig and ModuleSpec for InternVideo2's ViT blocks.

The local spec (megatron-core's ColumnParallelLinear/RowParallelLinear, torch norms, and the core
attention ``train.attention`` picks, :mod:`kernels.attention`) runs everywhere; the Transformer
Engine spec (fused norm+linear, TE attention) is chosen by :func:`kernels.backends.layer_backend`
on a GPU with TE importable.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from kernels.attention import core_attention
from kernels.backends import layer_backend
from kernels.float8 import local_linears
from kernels.norms import NORMS
from megavideo.config import EncoderConfig, ParallelConfig, TrainConfig, ViTConfig
from megavideo.config.megatron import pipeline_settings, transformer_settings
from parallel.layout import padded_heads


@dataclass
class LayerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the choices of this codebase's local-spec layers."""

    float8: str = ""  # torchao's FP8 recipe for the local spec's linears ('' : none)
    fused_residual: bool = False  # train.fusions: residual (kernels.fused)
    fused_qk_norm: bool = False  # train.fusions: qk_norm


@dataclass
class ViTTransformerConfig(LayerConfig):
    """megatron-core's TransformerConfig plus what InternVideo2's blocks add to it."""

    real_attention_heads: int = 0  # heads before padding to a multiple of tp
    full_width_qk_norm: bool = False
    layer_scale_init: float = 0.0
    drop_path_rate: float = 0.0
    residual_scale: float = 1.0  # DeepNorm's alpha on post-norm residuals (BEATs)


def transformer_config(
    vit: EncoderConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    *,
    pipelined: bool,
    sequence_parallel: bool,
    fp8: bool = True,
) -> ViTTransformerConfig:
    """The config of one encoder's layers. Only the video encoder is pipelined and runs with SP;
    the teachers and the text and audio encoders are whole on their pipeline stage. ``fp8``:
    FP8 GEMMs under ``train.precision=fp8`` (a frozen teacher's only with fp8.teachers)."""
    heads = padded_heads(vit.num_heads, parallel.tp)
    return ViTTransformerConfig(
        num_layers=vit.num_layers,
        hidden_size=vit.hidden_size,
        num_attention_heads=heads,
        kv_channels=vit.head_dim,
        ffn_hidden_size=vit.mlp_hidden_size,
        tensor_model_parallel_size=parallel.tp,
        **pipeline_settings(vit.num_layers, parallel, pipelined),
        sequence_parallel=sequence_parallel and parallel.tp > 1,
        normalization="RMSNorm" if vit.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=vit.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=vit.qkv_bias,
        **_activation(vit.activation, transformer_settings(train, fp8)),
        real_attention_heads=vit.num_heads,
        full_width_qk_norm=vit.qk_norm,
        layer_scale_init=vit.layer_scale_init,
        drop_path_rate=vit.drop_path,
    )


def _activation(activation: str, settings: dict) -> dict:
    """The MLP's activation with the shared settings: megatron-core's fused bias+GELU is the tanh
    form, so the tanh GELU takes ``F.gelu`` with the fusion on (megatron-core then runs its fused
    tanh kernel) and ``gelu(approximate="tanh")`` without; the exact GELU never fuses."""
    fused = settings["bias_activation_fusion"] and activation == "gelu_tanh"
    exact = activation == "gelu" or fused
    return {**settings, "bias_activation_fusion": fused,
            "activation_func": F.gelu if exact else partial(F.gelu, approximate="tanh")}


def without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """The same config for modules that see the whole sequence (heads, aligners): no SP, so
    no TP communication overlap either."""
    out = copy.copy(config)
    out.sequence_parallel = False
    out.tp_comm_overlap = False
    return out


@functools.cache
def without_bias(linear: type) -> type:
    """``linear`` that never has a bias: InternVideo2's qkv projection has none while the other
    linears do (megatron-core hands every linear the config's bias setting)."""

    class NoBias(linear):
        def __init__(self, *args, bias: bool = False, **kwargs) -> None:
            super().__init__(*args, bias=False, **kwargs)

    NoBias.__name__ = NoBias.__qualname__ = f"{linear.__name__}NoBias"
    return NoBias


def vit_layer_spec(vit: ViTConfig, config: LayerConfig, attn_mask_type: AttnMaskType,
                   tp_group=None) -> ModuleSpec:
    """The ModuleSpec of one InternVideo2 block for the backend this process runs (its q/k norm
    spans the TP group ``tp_group``, by default megatron-core's; ``config`` gives the core
    attention and the local spec's FP8 linears)."""
    from megavideo.models.layers import FullWidthQKNorm, InternVideo2Block

    qk_norm = ModuleSpec(module=FullWidthQKNorm, params={"tp_group": tp_group}) \
        if vit.qk_norm else None
    if layer_backend() == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        norm = IdentityOp
        qkv = TELayerNormColumnParallelLinear if vit.qkv_bias else \
            without_bias(TELayerNormColumnParallelLinear)
        core, proj, fc1, fc2 = (TEDotProductAttention, TERowParallelLinear,
                                TELayerNormColumnParallelLinear, TERowParallelLinear)
    else:
        norm = NORMS[vit.norm]
        column, row = local_linears(config.float8)
        qkv = column if vit.qkv_bias else without_bias(column)
        core, proj, fc1, fc2 = core_attention(config.attention_backend), row, column, row
    return ModuleSpec(
        module=InternVideo2Block,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core,
                    linear_proj=proj,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _kv_from(linear: type, width: int) -> type:
    """``linear`` whose input width is ``width``: megatron-core's CrossAttention builds its key/value
    projection from the layer's own width, BERT's reads the video tokens' (``encoder_width``)."""

    class KVLinear(linear):
        def __init__(self, input_size: int, output_size: int, **kwargs) -> None:
            del input_size
            super().__init__(width, output_size, **kwargs)

    return KVLinear


def mask_type(padded: bool) -> AttnMaskType:
    """``padding`` for attention that is handed a padding mask, ``no_mask`` for attention that
    sees every token (TE's padding attention refuses to run without a mask)."""
    return AttnMaskType.padding if padded else AttnMaskType.no_mask


def cross_attention_mask(kv_mask: torch.Tensor | None, queries: int):
    """A padding mask of the memory tokens [b, 1, 1, m] (True: absent) as the backend's
    cross-attention reads it: megatron-core's local attention broadcasts it over the queries;
    TE's padding cross-attention takes a (query mask, key/value mask) pair, here with every one
    of the ``queries`` present."""
    if kv_mask is None or layer_backend() != "te":
        return kv_mask
    query_mask = torch.zeros(kv_mask.shape[0], 1, 1, queries, dtype=torch.bool,
                             device=kv_mask.device)
    return query_mask, kv_mask


def post_norm_layer_spec(enc: EncoderConfig, config: LayerConfig, cross_width: int = 0,
                         tp_group=None, *, padded: bool = False,
                         cross_padded: bool = False, relative_bias: bool = False,
                         arbitrary: bool = False) -> ModuleSpec:
    """A post-norm encoder layer (BERT, BEATs), with cross-attention to ``cross_width``-wide
    tokens when it is set. The three norm slots of megatron-core's layer hold the norms *after*
    self-attention, cross-attention and the MLP. ``padded``/``cross_padded``: the self-/cross-
    attention is given a padding mask (of the tokens/of the memory). ``tp_group``: a TP group
    other than megatron-core's (megatron-core's CrossAttention does not hand its group to its q
    and kv projections, so the spec does). ``config`` gives the core attention and the local
    spec's FP8 linears. ``relative_bias``: the core attention is BEATs' gated relative position
    attention (on SDPA with either backend's linears). ``arbitrary``: the self-attention is given a
    full [b, 1, s, s] mask (the QFormer's: queries and text, causal captions)."""
    from megavideo.models.audio import GatedRelativeAttention
    from megavideo.models.encoders import PostNormLayer

    if layer_backend() == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )

        column, row, core = TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        (column, row), core = local_linears(config.float8), core_attention(config.attention_backend)
    if relative_bias:
        core = GatedRelativeAttention
    norm = NORMS[enc.norm]
    cross = IdentityOp
    if cross_width:
        cross = ModuleSpec(
            module=CrossAttention,
            params={"attn_mask_type": mask_type(cross_padded)},
            submodules=CrossAttentionSubmodules(
                linear_q=partial(column, tp_group=tp_group),
                linear_kv=partial(_kv_from(column, cross_width), tp_group=tp_group),
                core_attention=core, linear_proj=row),
        )
    return ModuleSpec(
        module=PostNormLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary if arbitrary
                        else mask_type(padded)},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core,
                                                   linear_proj=row),
            ),
            pre_cross_attn_layernorm=norm if cross_width else IdentityOp,
            cross_attention=cross,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )
