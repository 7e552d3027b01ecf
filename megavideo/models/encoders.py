"""Post-norm transformer layers (BERT, BEATs) on megatron-core's layer and its submodules.

    x = norm1(a x + attn(x))                   self-attention
    x = norm2(x + cross(x, memory))            cross-attention (BERT's fusion layers, the QFormer's)
    x = norm3(a x + mlp(x))

``a`` is DeepNorm's residual scale (BEATs: (2 N)^(1/4); 1 for BERT). megatron-core's layer is
pre-norm; its three norm slots hold the norms after each branch here, so BERT's and BEATs' weights
map one to one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from kernels.float8 import keep_configured_bf16
from megavideo.config import EncoderConfig
from megavideo.models.layers import fp8_stack_context, run_layer
from megavideo.models.specs import ViTTransformerConfig, cross_attention_mask, post_norm_layer_spec


class PostNormLayer(TransformerLayer):
    """One post-norm encoder layer (see the module docstring)."""

    @property
    def crosses(self) -> bool:
        return not isinstance(self.cross_attention, IdentityOp)

    drop_path = 0.0  # stochastic depth on each branch, per sample (the QFormer's)

    def _add(self, x: torch.Tensor, out_with_bias, scale: float) -> torch.Tensor:
        out, bias = out_with_bias
        if bias is not None:
            out = out + bias
        if self.config.hidden_dropout:  # BERT's (the official recipe)
            out = F.dropout(out, self.config.hidden_dropout, self.training)
        if self.drop_path and self.training:  # [s, b, h]: one draw per sample
            keep = 1.0 - self.drop_path
            out = out * out.new_empty(1, out.shape[1], 1).bernoulli_(keep) / keep
        return x * scale + out if scale != 1.0 else x + out

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                attention_bias=None, **_unused):
        a = self.config.residual_scale
        attn = self.self_attention(hidden_states, attention_mask=attention_mask,
                                   attention_bias=attention_bias)
        x = self.input_layernorm(self._add(hidden_states, attn, a))
        if context is not None and self.crosses:
            mask = cross_attention_mask(context_mask, x.shape[0])
            x = self.pre_cross_attn_layernorm(self._add(
                x, self.cross_attention(x, attention_mask=mask, key_value_states=context), 1.0))
        return self.pre_mlp_layernorm(self._add(x, self.mlp(x), a))


class EncoderLayers(nn.Module):
    """``enc.num_layers`` post-norm layers; those in ``cross_layers`` cross-attend to
    ``cross_width``-wide memory tokens. Run any contiguous range of them (BERT's text and fusion
    modes); full recomputation checkpoints each layer. ``relative_bias``: the self-attention
    adds BEATs' gated relative position bias (:mod:`megavideo.models.audio`)."""

    def __init__(self, enc: EncoderConfig, config: ViTTransformerConfig,
                 cross_layers: Collection[int] = (), cross_width: int = 0,
                 pg_collection=None, *, padded: bool = False, cross_padded: bool = False,
                 relative_bias: bool = False, arbitrary: bool = False,
                 layer: type[PostNormLayer] | None = None,
                 params: Sequence[dict] = ()) -> None:
        super().__init__()
        specs = [post_norm_layer_spec(enc, config, cross_width if i in cross_layers else 0,
                                      getattr(pg_collection, "tp", None), padded=padded,
                                      cross_padded=cross_padded, relative_bias=relative_bias,
                                      arbitrary=arbitrary)
                 for i in range(enc.num_layers)]
        if layer is not None:  # another layer class on the same submodules, its own params
            specs = [replace(spec, module=layer, params=params[i] if params else {})
                     for i, spec in enumerate(specs)]
        self.layers = nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1, pg_collection=pg_collection)
            for i, spec in enumerate(specs))
        self.recompute = config.recompute_granularity == "full"
        self.config = config
        self.tp_group = getattr(pg_collection, "tp", None) or \
            parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        keep_configured_bf16(self.layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, start: int = 0,
                stop: int | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None,
                query_length: int | None = None) -> torch.Tensor:
        """x [s, b, h]; mask [b, 1, 1, s] True on padding (None: no padding; [b, 1, s, s] for
        ``arbitrary`` layers); context [m, b, w], context_mask [b, 1, 1, m] True on absent
        memory tokens (None: all present). The masks are the ones the layers were built for
        (``padded``, ``cross_padded``). attention_bias: the ungated relative position bias
        [1, heads, s, s] of ``relative_bias`` layers. query_length: the QFormer's layers' (its
        first tokens the queries, the rest text)."""
        recompute = self.recompute and self.training
        options = {} if query_length is None else {"query_length": query_length}
        with fp8_stack_context(self.config):
            for layer in self.layers[start:stop]:
                x = run_layer(layer, self.config, recompute, self.tp_group, x, mask, context,
                              context_mask, attention_bias, **options)
        return x
