"""Counter-based random numbers drawn on the device from per-sample keys.

A draw that depends on what the model computed (the attention-guided mask, stage 2's hard
negatives) or that feeds the model directly (MLM masking) runs where the tensors live: no copy to
the host, no sync, no Python loop over samples. Each number is a hash of (sample key, position),
so it does not depend on the parallel layout or which rank draws it, and a resumed run draws the
same numbers. The hash is Chris Wellons' ``lowbias32`` on 32-bit words held in int64 (every
product stays below 2**63), so the integers and the uniforms are the same bits on every device;
the normal numbers agree up to the float64 rounding of log and cos.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 32-bit x, in 16-bit halves so no product overflows int64."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] float64 numbers uniform on (0, 1), one stream per key.

    keys [B] int64 (non-negative, e.g. :func:`dataloaders.synthetic.sample_keys`); the result lives
    on the keys' device.
    """
    count = 1
    for n in shape:
        count *= n
    low, high = keys & _MASK32, (keys >> 32) & _MASK32
    stream = _lowbias32(high ^ _lowbias32(low))[:, None]  # [B, 1]
    counter = torch.arange(count, device=keys.device, dtype=torch.long)[None, :]
    bits = _lowbias32(_lowbias32((counter + _mul32(stream, _GOLDEN)) & _MASK32) ^ stream)
    return ((bits.double() + 0.5) / 2.0**32).view(keys.shape[0], *shape)


def normal(keys: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] float32 standard normal numbers (Box-Muller on two uniforms per number), one
    stream per key, on the keys' device."""
    u = uniform(keys, (2, count))
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    return (radius * torch.cos(2.0 * torch.pi * u[:, 1])).float()


def gumbel(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard Gumbel noise (float64): argmax(log p + noise) samples p, and the top k
    of it sample k without replacement (the Gumbel-top-k trick)."""
    return -torch.log(-torch.log(uniform(keys, shape)))


__all__ = ["gumbel", "normal", "uniform"]
