"""FP8 GEMMs for megatron-core's local-spec linears through torchao's float8 training.

torchtitan swaps ``nn.Linear`` for torchao's ``Float8Linear``; megatron-core's parallel linears are
not ``nn.Linear``, so these subclasses keep everything megatron-core's do (parameters, their TP
layout and names, the sequence-parallel all-gather / reduce-scatter, the TP all-reduce of the
input gradient) and replace only the GEMM with torchao's ``matmul_with_hp_or_float8_args``: the
input, weight and output gradient cast to FP8 with dynamic scales (``tensorwise``: one per tensor;
``rowwise``: one per row), ``torch._scaled_mm`` on the three GEMMs of forward and backward.

Every layout is covered: column- and row-parallel linears at any tp, with or without SP (the
sequence-parallel input is gathered before its cast, so every rank casts the same tensor). Each
rank scales its own weight shard, so a layout's FP8 numbers differ from another's by FP8
rounding, not by more; exact layout parity holds in bf16, not in FP8.
"""

from __future__ import annotations

import functools

from megatron.core.fp8_utils import is_first_last_bf16_layer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import nn


@functools.cache
def torchao_config(recipe: str):
    """torchao's Float8LinearConfig for ``recipe``: tensorwise (e4m3 input and weight, e5m2
    gradients) or rowwise (e4m3 everywhere, power-of-2 scales)."""
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig.from_recipe_name(recipe)


def _mm_config(config):
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    gemms = (config.gemm_config_output, config.gemm_config_grad_input,
             config.gemm_config_grad_weight)
    return LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False,
                                           config.pad_inner_dim) for g in gemms))


class Float8Linear:
    """The FP8 GEMM of a megatron-core parallel linear (mixed into its column/row class)."""

    float8 = True  # False: this linear's layer is kept in bf16 (fp8.bf16_first/last_layers)

    def _setup_float8(self, config) -> None:
        self._float8 = torchao_config(config.float8)
        self._float8_mm = _mm_config(self._float8)

    def _forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                      sequence_parallel, tp_group=None, **_unused):
        if not self.float8:
            return super()._forward_impl(input, weight, bias, gradient_accumulation_fusion,
                                         allreduce_dgrad, sequence_parallel, tp_group=tp_group,
                                         **_unused)
        if gradient_accumulation_fusion:
            raise ValueError("torchao's FP8 linears take no fused weight-gradient accumulation.")
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        group = tp_group or self.tp_group
        if sequence_parallel:  # all-gather forward, reduce-scatter the input gradient
            input = gather_from_sequence_parallel_region(input, True, group=group)
        elif allreduce_dgrad:  # identity forward, all-reduce the input gradient
            input = copy_to_tensor_model_parallel_region(input, group=group)
        out = matmul_with_hp_or_float8_args.apply(input, weight.t(), self._float8_mm,
                                                  self._float8)
        return out if bias is None else out + bias


class Float8ColumnParallelLinear(Float8Linear, ColumnParallelLinear):
    def __init__(self, *args, config, **kwargs) -> None:
        super().__init__(*args, config=config, **kwargs)
        self._setup_float8(config)


class Float8RowParallelLinear(Float8Linear, RowParallelLinear):
    def __init__(self, *args, config, **kwargs) -> None:
        super().__init__(*args, config=config, **kwargs)
        self._setup_float8(config)


def keep_bf16(module: nn.Module) -> None:
    """Run every FP8 linear inside ``module`` (a layer kept in bf16) in bf16."""
    for child in module.modules():
        if isinstance(child, Float8Linear):
            child.float8 = False


def keep_configured_bf16(layers) -> None:
    """Keep in bf16 the FP8 linears of each megatron-core TransformerLayer in ``layers`` that its
    config keeps in bf16 (``fp8.bf16_first_layers`` / ``bf16_last_layers``: megatron-core's rule,
    by global layer number)."""
    for layer in layers:
        if is_first_last_bf16_layer(layer.config, layer.layer_number - 1):
            keep_bf16(layer)


def local_linears(float8: str) -> tuple[type, type]:
    """The local spec's (column, row) parallel linears: torchao's FP8 ones when ``float8`` names
    a recipe, megatron-core's otherwise."""
    if float8:
        return Float8ColumnParallelLinear, Float8RowParallelLinear
    return ColumnParallelLinear, RowParallelLinear
