"""Stand-ins for megatron-core's Transformer Engine layers with TE's parameter layout, to build
the TE spec's module tree on a machine without CUDA (TE asserts CUDA in every module's
constructor). They hold parameters only and cannot run: what they show is the names and
shapes a TE build has. Layout as TE 2.x registers it (``transformer_engine/pytorch/module``):

- ``Linear``: ``weight`` [out, in] and ``bias`` [out]; without a bias, ``bias`` is an empty plain
  tensor, not a parameter;
- ``LayerNormLinear``: the same plus ``layer_norm_weight`` [in] and, for LayerNorm (not RMSNorm),
  ``layer_norm_bias`` [in];
- ``RMSNorm``/``LayerNorm`` (megatron-core's ``TENorm``): ``weight`` (and ``bias``);
- ``DotProductAttention``: no parameters.

Column-parallel weights and biases are split along dim 0, row-parallel weights along dim 1, with
megatron-core's tensor-parallel attributes, as TE sets them.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import get_pg_size
from torch import nn


def _tp(config, tp_group) -> int:
    return get_pg_size(tp_group) if tp_group is not None else config.tensor_model_parallel_size


class _LinearTwin(nn.Module):
    partition_dim = 0

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool = True,
                 tp_group=None, **_kwargs) -> None:
        super().__init__()
        tp = _tp(config, tp_group)
        shape = (output_size // tp, input_size) if self.partition_dim == 0 \
            else (output_size, input_size // tp)
        self.weight = nn.Parameter(torch.empty(shape, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, self.partition_dim, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(shape[0], dtype=config.params_dtype))
            if self.partition_dim == 0:
                set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.bias = torch.Tensor()  # TE's placeholder: a plain empty tensor


class ColumnTwin(_LinearTwin):
    """megatron-core's TEColumnParallelLinear."""


class RowTwin(_LinearTwin):
    """megatron-core's TERowParallelLinear."""

    partition_dim = 1


class LayerNormColumnTwin(ColumnTwin):
    """megatron-core's TELayerNormColumnParallelLinear: the norm before the linear, inside it."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        dtype = config.params_dtype
        self.layer_norm_weight = nn.Parameter(torch.ones(input_size, dtype=dtype))
        self.layer_norm_bias = nn.Parameter(torch.zeros(input_size, dtype=dtype)) \
            if config.normalization == "LayerNorm" else None


class AttentionTwin(nn.Module):
    """megatron-core's TEDotProductAttention (no parameters)."""

    def __init__(self, *_args, **_kwargs) -> None:
        super().__init__()


class NormTwin(nn.Module):
    """megatron-core's TENorm."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_kwargs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        if config.normalization == "LayerNorm":
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))


TWINS = {"TEColumnParallelLinear": ColumnTwin, "TERowParallelLinear": RowTwin,
         "TELayerNormColumnParallelLinear": LayerNormColumnTwin,
         "TEDotProductAttention": AttentionTwin, "TENorm": NormTwin}


def install(monkeypatch) -> None:
    """Make megatron-core's TE layer names (and its TE GPT spec provider) resolve to the twins."""
    from megatron.core.extensions import transformer_engine, transformer_engine_spec_provider
    from megatron.core.models.gpt import gpt_layer_specs

    for module in (transformer_engine, transformer_engine_spec_provider):
        for name, twin in TWINS.items():
            monkeypatch.setattr(module, name, twin)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider",
                        transformer_engine_spec_provider.TESpecProvider, raising=False)
    # the provider asks TE's version for a few choices: answer as a current TE (2.x) would
    monkeypatch.setattr(transformer_engine_spec_provider, "is_te_min_version", lambda *_a, **_k: True)
