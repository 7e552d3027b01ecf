"""Activation memory: the bytes a transformer layer saves for its backward pass, measured and analytic.

Measured: :class:`SavedTensors` watches what autograd packs for backward
(``torch.autograd.graph.saved_tensors_hooks``) and adds up the storages behind it, each once;
:func:`measure_layer_bytes` turns that into bytes per layer of a block stack.

Analytic: :func:`vit_layer_bytes` (InternVideo2's block on megatron-core's local spec) and
:func:`llm_layer_bytes` (the Mistral-shaped decoder layer), written as sums of named terms in the
manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", 34sbh + 5as^2b). Both count bytes on one tensor-parallel rank for one micro-batch and
leave out what lives outside the layers (embeddings, heads, the loss) and what one layer shares
with all others (the stochastic-depth draws ``drop_u``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from kernels.attention import attention_kernel
from kernels.backends import layer_backend
from megavideo.config import Config
from megavideo.models.specs import transformer_config
from megavideo.models.video import Tokens
from megavideo.models.vit import block_stack
from parallel.distributed import device as rank_device
from parallel.layout import padded_heads

FP32 = 4  # bytes of the values this repo computes in fp32 whatever the model's dtype
RECOMPUTE = ("none", "selective", "full")
# the core attention's kernel: unfused (the score matrix), sdpa (PyTorch's fused kernels), flash
# (flash-attn, TE's fused attention: grouped-query attention without repeating k and v)
ATTENTION = ("unfused", "sdpa", "flash")


class SavedTensors:
    """Counts the bytes autograd saves for backward while the context is active.

    Every saved tensor is traced to its storage; a storage counts once and whole (a view saved
    for backward keeps all of its storage alive). Parameters and views of them are not
    activations and are skipped, as are the storages of the tensors in ``exclude``. The storages
    seen are held until the context exits, so a freed temporary's address cannot be mistaken for
    a storage already counted. ``bytes`` is final after exit.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return tensor
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self._excluded and ptr not in self._storages:
            self._storages[ptr] = storage
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensors:
        self.bytes = 0
        self._storages.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._storages.clear()


@contextlib.contextmanager
def _first_layers(stack: nn.Module, count: int) -> Iterator[None]:
    """``stack`` running only its first ``count`` layers (megatron-core's TransformerBlock keeps
    its layers in ``layers`` and, for full recomputation, their count per pipeline rank)."""
    layers = stack.layers
    per_rank = getattr(stack, "num_layers_per_pipeline_rank", None)
    stack.layers = nn.ModuleList(list(layers)[:count])
    if per_rank is not None:
        stack.num_layers_per_pipeline_rank = count
    try:
        yield
    finally:
        stack.layers = layers
        if per_rank is not None:
            stack.num_layers_per_pipeline_rank = per_rank


def saved_bytes(module: nn.Module, *args, **kwargs) -> int:
    """Bytes ``module(*args, **kwargs)`` saves for backward on this rank (its graph is dropped)."""
    with SavedTensors(exclude=module.parameters()) as saved:
        module(*args, **kwargs)
    return saved.bytes


def measure_layer_bytes(stack: nn.Module, *args, **kwargs) -> float:
    """Saved bytes per layer per micro-batch on this rank for a stack of L >= 2 identical layers
    (megatron-core's TransformerBlock or this repo's BlockStack), called like ``stack(*args,
    **kwargs)`` in training mode.

    The difference (saved(L layers) - saved(first layer)) / (L - 1), the mean over layers 2..L:
    what the stack saves once (a final norm; tensors every layer shares, such as ``drop_u`` or a
    mask passed in) cancels, and each layer is charged for what it keeps of its input (the
    previous layer's output), as in the analytic formulas. Full recomputation is counted too: the
    checkpoint around each layer saves outside the layer's own forward, which hooks on the
    layers would miss.
    """
    layers = len(stack.layers)
    if layers < 2:
        raise ValueError(f"measure_layer_bytes needs a stack of at least 2 layers, got {layers}.")
    total = saved_bytes(stack, *args, **kwargs)
    with _first_layers(stack, 1):
        first = saved_bytes(stack, *args, **kwargs)
    return (total - first) / (layers - 1)


def _check(tokens: int, tp: int, sp: bool, recompute: str, attention: str) -> int:
    """Validates the shared arguments; returns the rows of the residual stream on this rank."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got '{recompute}'.")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got '{attention}'.")
    if sp and tokens % tp:
        raise ValueError(f"sequence parallelism needs tokens ({tokens}) divisible by tp ({tp}).")
    return tokens // tp if sp else tokens


def vit_layer_bytes(
    hidden: int,
    heads: int,
    mlp: int,
    tokens: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    recompute: str,
    bytes_per_value: int,
    attention: str = "unfused",
    qk_norm: bool = True,
    layer_scale: bool = True,
    drop_path: bool = False,
) -> float:
    """Bytes one InternVideo2 block (:class:`megavideo.models.layers.InternVideo2Block` on the
    local spec) saves for backward on one TP rank, per micro-batch.

    Symbols: s tokens, b micro-batch, h hidden, t tp, r = s/t under SP else s (rows of the
    residual stream on this rank), q = (a/t)·d the rank's attention width (a heads padded to a
    multiple of t, d = h / heads), m/t the rank's MLP width, B ``bytes_per_value`` (2 in bf16, 4
    in fp32). The norms, the q/k norm and the layer scale compute in fp32 (4 bytes) and so does
    the softmax (megatron-core's attention_softmax_in_fp32).

    recompute="none", attention="unfused":

    ======================================  ==========================  =======================
    term                                    saved by                    bytes
    ======================================  ==========================  =======================
    norm1 input, fp32                       RMSNorm (x.float())         4·r·b·h
    norm1 1/rms                             RMSNorm                     4·r·b
    norm1 normalised input                  RMSNorm (weight ·)          B·r·b·h
    qkv input (norm1 output)                ColumnParallelLinear        B·r·b·h
    qkv output (v is a view of it)          bmm(probs, v), q/k norm     3·B·s·b·q
    q, k in fp32 (only when B != 4)         q/k norm                    2·4·s·b·q
    q, k 1/rms (full width: not split)      q/k norm                    2·4·s·b
    q, k normalised                         q/k norm (weight ·)         2·B·s·b·q
    q, k (q/k norm outputs)                 baddbmm(q, k)               2·B·s·b·q
    softmax output, fp32                    softmax                     4·b·(a/t)·s²
    probabilities in B (only when B != 4)   bmm(probs, v)               B·b·(a/t)·s²
    context                                 RowParallelLinear (proj)    B·s·b·q
    proj output + bias, fp32                layer scale 1               4·r·b·h
    norm2 input, 1/rms, normalised          RMSNorm                     4·r·b·h + 4·r·b + B·r·b·h
    fc1 input (norm2 output)                ColumnParallelLinear        B·r·b·h
    GELU input (fc1 output + bias)          GELU                        B·s·b·m/t
    fc2 input (GELU output)                 RowParallelLinear           B·s·b·m/t
    fc2 output + bias, fp32                 layer scale 2               4·r·b·h
    ======================================  ==========================  =======================

    Summed: 4·(8·r·b·h + 2·r·b + 8·s·b·q + 2·s·b·m/t + 2·s·b + b·(a/t)·s²) in fp32, which at
    t = 1 is 4·(16·s·b·h + 2·s·b·m + 4·s·b + a·s²·b); in bf16 at t = 1, 48·s·b·h + 4·s·b·m +
    16·s·b + 6·a·s²·b (64·s·b·h with m = 4h, against the 34·s·b·h + 5·a·s²·b of Korthikanti et
    al.'s GPT layer: this block keeps more in fp32 and its q/k norm saves more, while attention
    dropout is 0 and saves nothing). Without ``qk_norm`` the q/k rows go (q and k are
    views of the qkv output); without ``layer_scale`` its rows go; with ``drop_path`` (training
    with a nonzero rate) each branch saves its [b] scale, 2·B·b (the branch itself is not saved:
    the scale needs no gradient).

    Only the r-rows divide by t under SP; the rest divides by t through the heads and the MLP
    width, except the q/k 1/rms, which every rank computes for all s·b rows (the sum of squares is
    all-reduced over TP). So (SP at t) = (t = 1 bytes - 8·s·b) / t + 8·s·b exactly when a and m
    divide by t.

    attention="flash" or "sdpa" (fused attention: flash-attn, TE's, PyTorch's SDPA; measured on
    the CPU's SDPA kernel): the softmax rows become the [b, a/t, s] fp32 log-sum-exp statistics,
    4·b·(a/t)·s; q, k, v and the output it saves are the tensors counted above.
    recompute="selective" (megatron-core's core_attn): the attention is checkpointed, which
    keeps q, k, v (counted above) and a 4-byte mask-type tensor; the softmax or flash rows go.
    recompute="full": each block is checkpointed and only its input stays, B·r·b·h.
    """
    r = _check(tokens, tp, sp, recompute, attention)
    s, b, h, B = tokens, micro_batch, hidden, bytes_per_value
    if mlp % tp:
        raise ValueError(f"the MLP width ({mlp}) must divide by tp ({tp}).")
    heads_here = padded_heads(heads, tp) // tp
    q = heads_here * (hidden // heads)
    if recompute == "full":
        return float(B * r * b * h)
    norm = FP32 * r * b * h + FP32 * r * b + B * r * b * h
    terms = [
        norm,                                    # norm1
        B * r * b * h,                           # qkv input
        3 * B * s * b * q,                       # qkv output
        B * s * b * q,                           # context
        norm,                                    # norm2
        B * r * b * h,                           # fc1 input
        2 * B * s * b * (mlp // tp),             # GELU input, fc2 input
    ]
    if qk_norm:
        upcast = 2 * FP32 * s * b * q if B != FP32 else 0
        terms.append(upcast + 2 * FP32 * s * b + 4 * B * s * b * q)
    if layer_scale:
        terms.append(2 * FP32 * r * b * h)
    if drop_path:
        terms.append(2 * B * b)  # the [b] keep/scale vectors
    if recompute == "selective":
        terms.append(4)  # the checkpoint's attn_mask_type tensor (int32)
    elif attention != "unfused":
        terms.append(FP32 * b * heads_here * s)
    else:
        probs = b * heads_here * s * s
        terms.append(FP32 * probs + (B * probs if B != FP32 else 0))
    return float(sum(terms))


def llm_layer_bytes(
    hidden: int,
    heads: int,
    kv_heads: int,
    mlp: int,
    tokens: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    recompute: str,
    bytes_per_value: int,
    attention: str = "unfused",
) -> float:
    """Bytes one decoder layer of the stage-3 LLM (:mod:`megavideo.models.llm`: megatron-core's
    GPT layer on the local spec with this repo's fp32 RMSNorm, grouped-query attention with g =
    ``kv_heads`` groups, RoPE, SwiGLU, no biases) saves for backward on one TP rank, per
    micro-batch. The causal or padding mask is shared by all layers and not counted.

    Symbols as in :func:`vit_layer_bytes`, with d = h / a the head dim, a/t and g/t the rank's
    heads and groups, m the SwiGLU width (fc1 is 2m wide).

    recompute="none", attention="unfused":

    ======================================  ==========================  =======================
    term                                    saved by                    bytes
    ======================================  ==========================  =======================
    norm1 input fp32, 1/rms, normalised     RMSNorm                     4·r·b·h + 4·r·b + B·r·b·h
    qkv input (norm1 output)                ColumnParallelLinear        B·r·b·h
    RoPE cos, sin for q and for k           mul                         4·B·s·d
    q after RoPE                            baddbmm                     B·s·b·(a/t)·d
    k, v when g < a: repeated to a heads    baddbmm, bmm                2·B·s·b·(a/t)·d
    k, v when g = a: k after RoPE, and the  baddbmm, bmm(probs, v)      B·s·b·(a/t)·d
      qkv output v is a view of                                           + 3·B·s·b·(a/t)·d
    softmax output, fp32                    softmax                     4·b·(a/t)·s²
    probabilities in B (only when B != 4)   bmm(probs, v)               B·b·(a/t)·s²
    context                                 RowParallelLinear (proj)    B·s·b·(a/t)·d
    norm2 input fp32, 1/rms, normalised     RMSNorm                     4·r·b·h + 4·r·b + B·r·b·h
    fc1 input (norm2 output)                ColumnParallelLinear        B·r·b·h
    fc1 output (SiLU's gate half views it)  SiLU                        2·B·s·b·m/t
    SiLU output, up half + offset           mul                         2·B·s·b·m/t
    fc2 input (the product)                 RowParallelLinear           B·s·b·m/t
    ======================================  ==========================  =======================

    The residual adds (bias-dropout-add with no bias and dropout 0) save nothing. Under SP only
    the r-rows divide by t; the RoPE tables never do.

    recompute="selective": the core attention is checkpointed on q and k after RoPE (k at its g
    groups) and v, a view that keeps the whole qkv output ((a + 2g)/t·d wide), plus a 4-byte
    mask-type tensor; the repeated k, v and the softmax rows go. attention="flash" (flash-attn,
    TE: grouped-query attention without repeating) saves those same q, k, v plus the [b, a/t, s]
    fp32 log-sum-exp statistics (4·b·(a/t)·s); attention="sdpa" (PyTorch's kernels, given k and
    v repeated to a/t heads as megatron-core's unfused attention repeats them) saves the
    repeated k, v instead when g < a, and the log-sum-exp statistics.
    recompute="full": only each layer's input, B·r·b·h.
    """
    r = _check(tokens, tp, sp, recompute, attention)
    s, b, h, B = tokens, micro_batch, hidden, bytes_per_value
    if heads % tp or kv_heads % tp or mlp % tp or heads % kv_heads:
        raise ValueError(f"heads ({heads}), kv_heads ({kv_heads}) and mlp ({mlp}) must divide by "
                         f"tp ({tp}), and heads by kv_heads.")
    if recompute == "full":
        return float(B * r * b * h)
    d = hidden // heads
    a, g = heads // tp, kv_heads // tp
    row = B * s * b * d  # one head's worth of q, k or v
    norm = FP32 * r * b * h + FP32 * r * b + B * r * b * h
    terms = [
        2 * norm,                                # norm1, norm2
        2 * B * r * b * h,                       # qkv input, fc1 input
        4 * B * s * d,                           # RoPE cos and sin, for q and for k
        a * row,                                 # q after RoPE
        a * row,                                 # context
        5 * B * s * b * (mlp // tp),             # fc1 output (2m), SiLU output, up, product
    ]
    repeated = g < a and attention != "flash" and recompute != "selective"
    # k and v as the kernel keeps them: repeated to a heads, or k after RoPE and the qkv output
    terms.append(2 * a * row if repeated else g * row + (a + 2 * g) * row)
    if recompute == "selective":
        terms.append(4)  # the checkpoint's attn_mask_type tensor (int32)
    elif attention == "unfused":
        probs = b * a * s * s
        terms.append(FP32 * probs + (B * probs if B != FP32 else 0))
    else:
        terms.append(FP32 * b * a * s)  # the log-sum-exp statistics
    return float(sum(terms))


def student_layer_bytes(cfg: Config) -> dict[str, float]:
    """Measured and analytic bytes one block of the config's video encoder saves per
    micro-batch at the config's tp, SP, recomputation and precision: a two-block stack run on a
    random residual stream (call on every rank of an initialised model-parallel world at that tp)."""
    vit, par, train = cfg.model.student, cfg.parallel, cfg.train
    sp = par.sp and par.tp > 1
    tokens = Tokens.of(cfg.model, par.tp, sp, train.precision == "fp8").length
    config = transformer_config(vit, par, train, pipelined=False, sequence_parallel=sp)
    device = rank_device()
    stack = block_stack(vit, config, 2).to(device).train()
    x = torch.randn(tokens // par.tp if sp else tokens, train.micro_batch, vit.hidden_size,
                    dtype=config.params_dtype, device=device, requires_grad=True)
    measured = measure_layer_bytes(stack, x, None, None)
    attention = "flash" if layer_backend() == "te" else attention_kernel(config.attention_backend)
    formula = vit_layer_bytes(vit.hidden_size, vit.num_heads, vit.mlp_hidden_size, tokens,
                              train.micro_batch, par.tp, sp, train.recompute,
                              config.params_dtype.itemsize, attention, vit.qk_norm,
                              bool(vit.layer_scale_init))
    return {"act/layer_bytes": measured, "act/layer_bytes_formula": formula}
