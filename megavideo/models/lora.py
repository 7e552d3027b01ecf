"""LoRA adapters on the LLM's attention projections, tensor-parallel like the layers they adapt.

    y = W x + (alpha / r) B A x          A [r, in] (Kaiming-uniform), B [out, r] (zeros)

- column-parallel W (``linear_qkv``, output split over TP): A is column-parallel too, its r
  outputs gathered on every rank (so it sees the sequence-parallel input the way W does); B is
  column-parallel over W's output rows.
- row-parallel W (``linear_proj``, input split over TP): A is row-parallel (its partial sums
  reduced, or reduce-scattered over the sequence with SP, as W's are); B is replicated and marked
  sequence-parallel when SP is on, so megatron-core sums its gradient over the TP group.

The base weights are frozen by the caller (``model.llm.tuning=lora``); only A and B train.
"""

from __future__ import annotations

import copy
import math

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megavideo.models.init import recorded


@recorded
def _kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _without_sp(config):
    out = copy.copy(config)
    out.sequence_parallel = False
    return out


class LoRAColumnParallelLinear(ColumnParallelLinear):
    """A column-parallel linear with a LoRA adapter (see the module docstring)."""

    def __init__(self, input_size: int, output_size: int, *, config, rank: int, alpha: float,
                 **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        group = self.tp_group
        self.lora_a = ColumnParallelLinear(input_size, rank, config=config, init_method=_kaiming,
                                           bias=False, gather_output=True, tp_group=group)
        self.lora_b = ColumnParallelLinear(rank, output_size, config=_without_sp(config),
                                           init_method=nn.init.zeros_, bias=False,
                                           gather_output=False, tp_group=group)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        low, _ = self.lora_a(x)  # [s, b, r] on every rank
        delta, _ = self.lora_b(low)  # [s, b, out / tp]
        return out + self.scale * delta, bias


class LoRARowParallelLinear(RowParallelLinear):
    """A row-parallel linear with a LoRA adapter (see the module docstring)."""

    def __init__(self, input_size: int, output_size: int, *, config, rank: int, alpha: float,
                 **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.lora_a = RowParallelLinear(input_size, rank, config=config, init_method=_kaiming,
                                        bias=False, input_is_parallel=True, skip_bias_add=True,
                                        tp_group=self.tp_group)
        self.lora_b = nn.Parameter(torch.zeros(output_size, rank, dtype=config.params_dtype))
        self.lora_b.sequence_parallel = config.sequence_parallel
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        low, _ = self.lora_a(x)  # [s(/tp), b, r]
        return out + self.scale * nn.functional.linear(low, self.lora_b), bias


def is_lora(name: str) -> bool:
    return ".lora_a." in name or name.endswith(".lora_b") or ".lora_b." in name


__all__ = ["LoRAColumnParallelLinear", "LoRARowParallelLinear", "is_lora"]
