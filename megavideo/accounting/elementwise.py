"""Memory traffic of the element-wise work of one InternVideo2 block: what runs at HBM bandwidth,
not at the tensor cores' rate, and what the fused kernels save.

Each eager element-wise op reads its inputs and writes its output through HBM at their dtypes;
a fused kernel reads its inputs once and writes once. Per block and micro-batch on one TP rank,
forward (symbols as in :func:`.activations.vit_layer_bytes`: r residual rows, s tokens, b
micro-batch, h hidden, q the rank's attention width, m/t its MLP width, a/t its heads, B bytes
per value; norms, q/k norm and layer scale compute in fp32):

==================================  ============================  ============================
op chain                            eager (bytes)                 fused (bytes)
==================================  ============================  ============================
RMSNorm, twice                      2·(28 + 4B)·r·b·h             the same (not fused here)
q/k RMSNorm, q and k                2·(28 + 4B)·s·b·q             2·3B·s·b·q (kernels.fused)
branch tail, twice: bias, layer     2·(9B + 16)·r·b·h; without    2·3B·r·b·h (kernels.fused)
scale, drop path, residual add      the layer scale 2·7B·r·b·h,
                                    without drop path 2B less
bias + GELU (megatron-core's)       2B·s·b·m/t                    the same
unfused attention's score matrix    (4B + 24)·b·(a/t)·s²          0 (SDPA / flash: on chip)
==================================  ============================  ============================

The backward pass moves about twice the forward's bytes (the gradient in, the saved inputs, the
gradient out); full recomputation adds one forward, selective recomputation the attention's
share. These are estimates of the eager ops as the local spec runs them; ``launch.bench_gpu``
measures the whole block, and the planner's HBM efficiency can be calibrated against it.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKWARD_FACTOR = 2.0  # backward bytes / forward bytes of an element-wise op


@dataclass(frozen=True)
class BlockShape:
    """One InternVideo2 block's work on one TP rank per micro-batch: its widths (``heads`` before
    padding to a multiple of ``tp``), its tokens, the layout and the value size."""

    hidden: int
    heads: int
    mlp: int
    tokens: int
    micro_batch: int
    tp: int = 1
    sp: bool = False
    recompute: str = "none"
    bytes_per_value: int = 2


def vit_layer_elementwise_bytes(shape: BlockShape, *, trained: bool = True,
                                attention: str = "flash", qk_norm: bool = True,
                                layer_scale: bool = True, drop_path: bool = True,
                                fused_residual: bool = False, fused_qk_norm: bool = False) -> float:
    """HBM bytes of one block's element-wise work per micro-batch on one TP rank (forward, and
    with ``trained`` backward and recomputation). ``attention`` "unfused" writes the score
    matrix, anything else keeps it on chip."""
    big_b, hidden, heads, tp = shape.bytes_per_value, shape.hidden, shape.heads, shape.tp
    padded = -(-heads // tp) * tp
    s, b = shape.tokens, shape.micro_batch
    r = s // tp if shape.sp else s
    q = padded // tp * (hidden // heads)
    mlp, recompute = shape.mlp, shape.recompute
    rows = r * b * hidden
    norms = 2 * (28 + 4 * big_b) * rows
    qk = 0.0
    if qk_norm:
        qk = 2 * (3 * big_b if fused_qk_norm else 28 + 4 * big_b) * s * b * q
    if fused_residual:
        tails = 2 * 3 * big_b * rows
    else:
        tail = (9 * big_b + 16) if layer_scale else 7 * big_b
        if not drop_path:
            tail -= 2 * big_b
        tails = 2 * tail * rows
    gelu = 2 * big_b * s * b * mlp // tp
    scores = (4 * big_b + 24) * b * (padded // tp) * s * s if attention == "unfused" else 0.0
    forward = norms + qk + tails + gelu + scores
    if not trained:
        return float(forward)
    again = {"full": forward, "selective": scores}.get(recompute, 0.0)
    return float(forward * (1 + BACKWARD_FACTOR) + again)


__all__ = ["BACKWARD_FACTOR", "BlockShape", "vit_layer_elementwise_bytes"]
