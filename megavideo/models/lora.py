"""LoRA adapters on the LLM's linears, as VideoChat2 trains InternVideo2-Chat (peft's LoRA on
q, k, v, o, gate, up, down and lm_head), tensor-parallel like the layers they adapt.

    y = W x + (alpha / r) B_p A_p dropout(x)       per part p of W's output
    A_p [r, in] (Kaiming-uniform), B_p [rows_p, r] (zeros)

A fused megatron-core weight keeps its layout and gets one adapter per Hugging Face projection:
``linear_qkv`` one each for q, k and v (interleaved per query group, as the weight is),
``linear_fc1`` one each for gate and up ([gate; up], split per half over TP), the others one.

- column-parallel W (output split over TP): each A_p is column-parallel, its r outputs gathered
  on every rank (so it sees the sequence-parallel input the way W does); each B_p is
  column-parallel over its part's rows, the parts interleaved into W's local layout.
- row-parallel W (input split over TP): A is row-parallel (its partial sums reduced, or
  reduce-scattered over the sequence with SP, as W's are); B is replicated and marked
  sequence-parallel under SP, so megatron-core sums its gradient over the TP group.

:func:`add_adapters` attaches them as a forward hook, so megatron-core's own linears (local or
Transformer Engine) stay what they are. The base weights are frozen by the caller
(``model.llm.tuning=lora``); only A and B train.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megavideo.models.init import recorded

QKV, GLU = ("q", "k", "v"), ("gate", "up")


@recorded
def _kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _without_sp(config):
    out = copy.copy(config)
    out.sequence_parallel = False
    return out


class ColumnAdapter(nn.Module):
    """One part's adapter on a column-parallel linear: [s(/tp), b, in] -> [s, b, rows / tp]."""

    def __init__(self, n_in: int, rows: int, rank: int, config, tp_group) -> None:
        super().__init__()
        self.a = ColumnParallelLinear(n_in, rank, config=config, init_method=_kaiming, bias=False,
                                      gather_output=True, tp_group=tp_group)
        self.b = ColumnParallelLinear(rank, rows, config=_without_sp(config),
                                      init_method=nn.init.zeros_, bias=False, gather_output=False,
                                      tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, _ = self.a(x)  # [s, b, r] on every rank
        return self.b(low)[0]


class RowAdapter(nn.Module):
    """The adapter of a row-parallel linear: [s, b, in / tp] -> [s(/tp), b, out]."""

    def __init__(self, n_in: int, n_out: int, rank: int, config, tp_group) -> None:
        super().__init__()
        self.a = RowParallelLinear(n_in, rank, config=config, init_method=_kaiming, bias=False,
                                   input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)
        self.b = nn.Parameter(torch.zeros(n_out, rank, dtype=config.params_dtype))
        self.b.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, _ = self.a(x)  # [s(/tp), b, r], summed over TP
        return F.linear(low, self.b)


class LoRA(nn.Module):
    """The adapters of one base linear (see the module docstring). ``parts`` names the Hugging
    Face projections fused in a column-parallel output, each ``rows`` per group, ``groups``
    groups interleaved (q, k, v: one group per query group); ``parts=()`` a row-parallel base."""

    def __init__(self, n_in: int, n_out: int, *, parts: tuple[str, ...], rows: tuple[int, ...],
                 groups: int, rank: int, alpha: float, dropout: float, config, tp_group) -> None:
        super().__init__()
        self.scale, self.dropout = alpha / rank, dropout
        self.local_groups = max(groups // tp_group.size(), 1)  # a TP rank's whole groups
        self.row = not parts
        if self.row:
            self.adapters = nn.ModuleDict({"out": RowAdapter(n_in, n_out, rank, config, tp_group)})
        else:
            assert sum(rows) * groups == n_out, (rows, groups, n_out)
            self.adapters = nn.ModuleDict({p: ColumnAdapter(n_in, r * groups, rank, config, tp_group)
                                           for p, r in zip(parts, rows, strict=True)})

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.dropout and self.training):
            return x
        # a row-parallel input is this rank's slice of the features: its own mask
        fork = tensor_parallel.get_cuda_rng_tracker().fork() if self.row else contextlib.nullcontext()
        with fork:
            return F.dropout(x, self.dropout, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._dropped(x)
        deltas = [adapter(x) for adapter in self.adapters.values()]
        if len(deltas) > 1:  # per group: its rows of each part in turn, as the fused weight
            g = self.local_groups
            deltas = [torch.cat([d.unflatten(-1, (g, -1)) for d in deltas], -1).flatten(-2)]
        return self.scale * deltas[0]


def _hook(module: nn.Module, args: tuple, output):
    out, bias = output
    return out + module.lora(args[0]).to(out.dtype), bias


def attach(linear: nn.Module, n_in: int, n_out: int, llm, config, parts: tuple[str, ...] = (),
           rows: tuple[int, ...] = (), groups: int = 1) -> None:
    """``linear.lora`` (a :class:`LoRA`) added to ``linear``'s output by a forward hook."""
    group = getattr(linear, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
    linear.lora = LoRA(n_in, n_out, parts=parts, rows=rows, groups=groups, rank=llm.lora_rank,
                       alpha=llm.lora_alpha, dropout=llm.lora_dropout, config=config, tp_group=group)
    linear.register_forward_hook(_hook)


def add_adapters(model: nn.Module, llm, config) -> None:
    """LoRA on every decoder layer's q, k, v, o, gate, up and down projections and on the output
    layer (where this pipeline chunk has it), as the official recipe trains."""
    head = llm.hidden_size // llm.num_heads
    width, per_group = llm.num_heads * head, llm.num_heads // llm.num_kv_heads * head
    qkv = width + 2 * llm.num_kv_heads * head
    for layer in model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        attach(attention.linear_qkv, llm.hidden_size, qkv, llm, config, QKV,
               (per_group, head, head), llm.num_kv_heads)
        attach(attention.linear_proj, width, llm.hidden_size, llm, config)
        attach(mlp.linear_fc1, llm.hidden_size, 2 * llm.mlp_hidden_size, llm, config, GLU,
               (llm.mlp_hidden_size, llm.mlp_hidden_size))
        attach(mlp.linear_fc2, llm.mlp_hidden_size, llm.hidden_size, llm, config)
    if getattr(model, "post_process", False):
        attach(model.output_layer, llm.hidden_size, model.output_layer.output_size, llm, config,
               ("out",), (model.output_layer.output_size,))


def is_lora(name: str) -> bool:
    return ".lora." in name


def adapter_of(name: str) -> tuple[str, str, str] | None:
    """``(base weight, part, a|b)`` of an adapter's single-rank parameter name, else None."""
    if not is_lora(name):
        return None
    base, rest = name.split(".lora.adapters.")
    part, matrix = rest.split(".")[:2]
    return f"{base}.weight", part, matrix


__all__ = ["LoRA", "add_adapters", "adapter_of", "attach", "is_lora"]
