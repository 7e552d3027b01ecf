"""InternVideo2's transformer block on megatron-core.

    x = x + drop_path(ls1(attn(norm1(x))))      attn: no qkv bias, q/k RMSNorm over the full width
    x = x + drop_path(ls2(mlp(norm2(x))))       ls: layer scale, applied in fp32

The tail of each branch (bias, layer scale, stochastic depth, residual add) and the q/k norm are
the element-wise chains of :mod:`kernels.fused`, one compiled kernel each with ``train.fusions``
residual and qk_norm. Stochastic depth draws come with the batch (``drop_u``, one uniform number
per sample, layer and branch), so every parallel layout, recomputation and tensor-parallel rank
drops the same samples.
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import get_pg_rank, make_viewless_tensor
from torch import nn

from kernels import fused
from kernels.float8 import keep_configured_bf16
from parallel.comm import all_reduce_sum, group_size
from parallel.tensors import zero_padding_heads


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma``, stored and applied in fp32 whatever the model's
    dtype (the block's residual chain, :mod:`kernels.fused`, applies it)."""

    def __init__(self, dim: int, init: float, sequence_parallel: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init, dtype=torch.float32))
        self.gamma.sequence_parallel = sequence_parallel

    def _apply(self, fn, recurse: bool = True):
        kept = self.gamma.data
        super()._apply(fn, recurse)
        if self.gamma.dtype != torch.float32:  # .bfloat16()/.half() cast: keep the fp32 values
            self.gamma.data = kept.to(self.gamma.device)
        return self


def drop_path_keep(u: torch.Tensor | None, rate: float, training: bool,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """Stochastic depth's per-sample factor [b] of a branch: 1 / (1 - rate) where u < 1 - rate,
    0 elsewhere; None when nothing is dropped."""
    if not training or rate == 0.0 or u is None:
        return None
    keep = 1.0 - rate
    return (u < keep).to(dtype) / keep


class FullWidthQKNorm(nn.Module):
    """RMSNorm of q (or k) over the full hidden width, not per head.

    Under tensor parallelism each rank holds a slice of the heads, so the sum of squares is
    all-reduced over the TP group. Zero padding heads add nothing to the sum, and the mean divides
    by the real width (heads before padding x head dim).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, tp_group=None) -> None:
        super().__init__()
        from megatron.core import parallel_state

        del hidden_size  # megatron-core passes the per-head size; this norm spans all heads
        self.tp_group = tp_group or parallel_state.get_tensor_model_parallel_group(
            check_initialized=False)
        tp = group_size(self.tp_group)
        self.heads = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.width = config.real_attention_heads * config.kv_channels
        self.eps = eps
        self.fused = config.fused_qk_norm  # train.fusions: qk_norm
        self.weight = nn.Parameter(torch.ones(self.heads * self.head_dim, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, heads, head_dim]
        weight = self.weight.view(self.heads, self.head_dim)
        if self.fused:  # the compiled kernels cast inside
            sum_sq = all_reduce_sum(fused.sum_squares(x), self.tp_group)
            return fused.rms_scale(x, sum_sq, weight, self.width, self.eps, x.dtype)
        xf = x.float()
        sum_sq = all_reduce_sum(fused.sum_squares_reference(xf), self.tp_group)
        return fused.rms_scale_reference(xf, sum_sq, weight, self.width, self.eps, x.dtype)


class InternVideo2Block(TransformerLayer):
    """A pre-norm ViT block with layer scale and stochastic depth (megatron-core submodules)."""

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs) -> None:
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        depth = max(config.num_layers - 1, 1)
        # linspace(0, drop_path, depth): the global layer index sets this block's rate
        self.drop_path_rate = config.drop_path_rate * (self.layer_number - 1) / depth
        sp = config.sequence_parallel
        self.ls1 = LayerScale(config.hidden_size, config.layer_scale_init, sp) \
            if config.layer_scale_init else None
        self.ls2 = LayerScale(config.hidden_size, config.layer_scale_init, sp) \
            if config.layer_scale_init else None
        if config.perform_initialization:
            # the official fix_init_weight: output projections of block i (1-based) / sqrt(2 i)
            scale = math.sqrt(2.0 * self.layer_number)
            with torch.no_grad():
                self.self_attention.linear_proj.weight.div_(scale)
                self.mlp.linear_fc2.weight.div_(scale)
        self._mark_head_padding(config)
        keep_configured_bf16([self])

    def _mark_head_padding(self, config) -> None:
        """Tag the per-head parameters; zero the padding heads' slices (they then provably add
        nothing: zero q, k, v give zero context, and zero gradients keep them zero)."""
        attn, head_dim = self.self_attention, config.kv_channels
        marks = [(attn.linear_qkv.weight, 0, 3 * head_dim), (attn.linear_proj.weight, 1, head_dim)]
        # TE's linears without a bias keep an empty plain tensor in ``bias``, not None
        if isinstance(getattr(attn.linear_qkv, "bias", None), nn.Parameter):
            marks.append((attn.linear_qkv.bias, 0, 3 * head_dim))
        for norm in (attn.q_layernorm, attn.k_layernorm):
            if norm is not None:
                marks.append((norm.weight, 0, head_dim))
        padded = config.num_attention_heads != config.real_attention_heads
        for param, dim, rows in marks:
            param.head_padding = (dim, rows, config.real_attention_heads)
            if padded:
                zero_padding_heads(param, get_pg_rank(self.tp_group))

    def _residual(self, x, out_with_bias, ls, u) -> torch.Tensor:
        """x + drop_path(ls(out + bias)): one kernel with train.fusions' residual."""
        out, bias = out_with_bias
        keep = drop_path_keep(u, self.drop_path_rate, self.training, x.dtype)
        chain = fused.residual if self.config.fused_residual else fused.residual_reference
        return chain(x, out, bias, ls.gamma if ls is not None else None, keep)

    def forward(self, hidden_states, attention_mask=None, drop_u=None, **_unused):
        u1 = u2 = None
        if drop_u is not None:  # [b, layers, 2]
            u1, u2 = drop_u[:, self.layer_number - 1].unbind(-1)
        attn = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask)
        hidden_states = self._residual(hidden_states, attn, self.ls1, u1)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return self._residual(hidden_states, mlp, self.ls2, u2)


def _delayed_scaling(config) -> bool:
    return bool(config.fp8) and config.fp8_recipe == Fp8Recipe.delayed


def fp8_stack_context(config):
    """The FP8 context around a whole stack of layers, as megatron-core's TransformerBlock enters
    it: Transformer Engine's autocast for delayed scaling (one amax reduction per stack); nothing
    for the other recipes and for bf16 (:func:`run_layer` enters theirs per layer)."""
    return get_fp8_context(config) if _delayed_scaling(config) else contextlib.nullcontext()


def run_layer(layer: nn.Module, config, recompute: bool, tp_group, *args, **options):
    """``layer(*args, **options)`` inside its FP8 context (recipes other than delayed scaling
    enter it per layer, so the first and last layers can stay bf16), checkpointed for full
    recomputation: under FP8 with Transformer Engine's checkpoint, whose recomputed forward
    reuses the first forward's scaling state instead of updating the amax statistics twice.
    ``options`` are not tensors and stay out of the checkpoint's saved inputs."""

    def forward(*inputs):
        inner = get_fp8_context(config, layer.layer_number - 1) \
            if config.fp8 and not _delayed_scaling(config) else contextlib.nullcontext()
        with inner:
            return layer(*inputs, **options)

    if not recompute:
        return forward(*args)
    if config.fp8:
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(forward, False, tensor_parallel.random.get_cuda_rng_tracker,
                             tp_group, *args)
    return tensor_parallel.checkpoint(forward, False, *args)


class BlockStack(TransformerBlock):
    """The blocks one model chunk holds, run in order; hands back the outputs of chosen layers.

    ``taps`` are global 0-based layer indices whose outputs (the raw residual stream) the caller
    needs for aligners or teacher targets. Full recomputation checkpoints each block. This forward
    replaces megatron-core's and enters FP8 as it does (:func:`fp8_stack_context`,
    :func:`run_layer`).
    """

    def forward(self, hidden_states, attention_mask=None, drop_u=None, taps=()):
        tapped = {}
        recompute = self.config.recompute_granularity == "full" and self.training
        with fp8_stack_context(self.config):
            for layer in self.layers:
                hidden_states = run_layer(layer, self.config, recompute, self.pg_collection.tp,
                                          hidden_states, attention_mask, drop_u)
                if layer.layer_number - 1 in taps:
                    tapped[layer.layer_number - 1] = hidden_states
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        hidden_states = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
        return hidden_states, tapped
