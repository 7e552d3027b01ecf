"""Heads of the stage-1 model: the attention pool and the aligners to the teachers' features.

All of them see the whole sequence ([N, B, d], replicated over the TP group); their linear layers
are tensor-parallel (megatron-core's Column/RowParallelLinear), their norms replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from kernels.norms import LayerNorm
from parallel.comm import group_size


def _column(config, n_in: int, n_out: int, *, gather: bool, tp_group) -> ColumnParallelLinear:
    return ColumnParallelLinear(n_in, n_out, config=config, init_method=config.init_method,
                                bias=True, gather_output=gather, tp_group=tp_group)


def _row(config, n_in: int, n_out: int, *, tp_group) -> RowParallelLinear:
    return RowParallelLinear(n_in, n_out, config=config, init_method=config.init_method, bias=True,
                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)


class AttentionPool(nn.Module):
    """InternVideo2's AttentionPoolingBlock: one query, the mean token, attends to all tokens.

    LayerNorms on query, keys and values, multi-head cross-attention, projection to ``out_dim``.
    With ``return_attention`` also the attention weights averaged over heads, [B, N] (used by the
    CLIP teacher to choose the visible tokens).
    """

    def __init__(self, config, dim: int, heads: int, out_dim: int, eps: float, tp_group) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.heads = heads
        self.local_heads = heads // group_size(tp_group)
        self.head_dim = dim // heads
        self.norm_q, self.norm_k, self.norm_v = (LayerNorm(config, dim, eps) for _ in range(3))
        self.q, self.k, self.v = (_column(config, dim, dim, gather=False, tp_group=tp_group)
                                  for _ in range(3))
        self.proj = _row(config, dim, out_dim, tp_group=tp_group)

    def forward(self, x: torch.Tensor, num_tokens: int | None = None, return_attention: bool = False):
        n, b, _ = x.shape  # [N, B, d]; tokens past num_tokens are padding
        num_tokens = n if num_tokens is None else num_tokens
        query = x[:num_tokens].mean(0, keepdim=True)  # [1, B, d]
        q = self.q(self.norm_q(query))[0].view(1, b, self.local_heads, self.head_dim)
        k = self.k(self.norm_k(x))[0].view(n, b, self.local_heads, self.head_dim)
        v = self.v(self.norm_v(x))[0].view(n, b, self.local_heads, self.head_dim)
        scores = torch.einsum("qbhd,kbhd->bhqk", q.float() * self.head_dim**-0.5, k.float())
        if num_tokens < n:
            scores[..., num_tokens:] = float("-inf")
        attn = scores.softmax(-1)  # [B, h, 1, N]
        out = torch.einsum("bhqk,kbhd->qbhd", attn.to(v.dtype), v).reshape(1, b, -1)
        out = self.proj(out)[0][0]  # [B, out_dim]
        if not return_attention:
            return out
        weights = attn.sum(1)[:, 0]  # sum over local heads: [B, N]
        if group_size(self.tp_group) > 1:
            torch.distributed.all_reduce(weights, group=self.tp_group)
        return out, weights / self.heads


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class ClipAligner(nn.Module):
    """Linear to the CLIP teacher's width, LayerNorm, L2 normalisation (``Linear_Decoder``)."""

    def __init__(self, config, dim: int, out_dim: int, eps: float, tp_group) -> None:
        super().__init__()
        self.head = _column(config, dim, out_dim, gather=True, tp_group=tp_group)
        self.norm = LayerNorm(config, out_dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.norm(self.head(x)[0]))


class MaeAligner(nn.Module):
    """MLP (Linear, GELU, Linear) to the MAE teacher's width, LayerNorm, L2 (``MLP_Decoder``)."""

    def __init__(self, config, dim: int, out_dim: int, eps: float, tp_group) -> None:
        super().__init__()
        self.fc1 = _column(config, dim, dim, gather=False, tp_group=tp_group)
        self.fc2 = _row(config, dim, out_dim, tp_group=tp_group)
        self.norm = LayerNorm(config, out_dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.norm(self.fc2(F.gelu(self.fc1(x)[0]))[0]))


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos between L2-normalised features, averaged over everything but the last dim."""
    return (2.0 - 2.0 * (pred.float() * target.float()).sum(-1)).mean()
