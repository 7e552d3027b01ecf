"""RMSNorm and LayerNorm in plain PyTorch, usable in megatron-core specs and sequence parallelism.

megatron-core's fallback norm (WrappedTorchNorm) refuses sequence parallelism. These norms mark their
parameters with ``sequence_parallel`` so megatron-core all-reduces their gradients over the TP group
when the activations they see are split along the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Norm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.sequence_parallel = bool(getattr(config, "sequence_parallel", False))


class RMSNorm(_Norm):
    """RMSNorm computed in fp32: ``weight * (x / rms(x)).to(dtype)`` (as InternVideo2's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class LayerNorm(_Norm):
    """LayerNorm with bias, computed in fp32."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
