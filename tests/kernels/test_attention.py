"""The core-attention kernels (kernels.attention) against megatron-core's DotProductAttention, one
process at tp 1: padding masks, causal masks, grouped-query and cross attention, fp32."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels.attention import SDPAttention, attention_kernel, core_attention
from megavideo.config import ConfigError, load_config, validate_device
from parallel.distributed import single_rank_world


@pytest.fixture(scope="module")
def world():
    with single_rank_world():
        yield


def _pair(mask_type: AttnMaskType, heads: int = 4, groups: int = 4):
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=16,
                               attention_dropout=0.0)
    return [cls(config, 1, mask_type, "self") for cls in (DotProductAttention, SDPAttention)]


CASES = {
    # name: mask type, heads, groups, query tokens, key tokens, masked key positions
    "no_mask": (AttnMaskType.no_mask, 4, 4, 17, 17, None),
    "padding": (AttnMaskType.padding, 4, 4, 18, 18, [16, 17]),  # SP padding at the tail
    "causal": (AttnMaskType.causal, 4, 4, 12, 12, "causal"),
    "grouped_query_causal": (AttnMaskType.causal, 4, 2, 12, 12, "causal"),
    "cross_padding": (AttnMaskType.padding, 4, 4, 6, 20, [3, 19]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_equals_megatrons_unfused_attention(world, name):
    mask_type, heads, groups, sq, sk, masked = CASES[name]
    unfused, sdpa = _pair(mask_type, heads, groups)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 2, heads, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(sk, 2, groups, 16, generator=gen, requires_grad=True) for _ in range(2))
    mask = None
    if masked == "causal":
        mask = torch.triu(torch.ones(sq, sk, dtype=torch.bool), 1)[None, None]
    elif masked is not None:
        mask = torch.zeros(2, 1, 1, sk, dtype=torch.bool)
        mask[..., masked] = True
    outs, grads = [], []
    for module in (unfused, sdpa):
        out = module(q, k, v, mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert outs[1].shape == (sq, 2, heads * 16)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads[1], grads[0], strict=True):
        # summation order only: within 1e-6 of the largest gradient (measured <= 8.9e-7; a query
        # that sees one key has an exact zero gradient that SDPA's kernel leaves at ~2.6e-6)
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * scale)


def test_each_setting_names_its_kernel():
    assert core_attention(AttnBackend.unfused) is DotProductAttention
    assert core_attention(AttnBackend.fused) is SDPAttention
    # auto: flash-attn only on a GPU where it is installed
    expected = "flash" if torch.cuda.is_available() and _has_flash_attn() else "sdpa"
    assert attention_kernel(AttnBackend.auto) == expected


def _has_flash_attn() -> bool:
    from kernels.backends import detect

    return detect().flash_attn


@pytest.mark.skipif(torch.cuda.is_available() and _has_flash_attn(),
                    reason="flash-attn runs on this node")
def test_flash_is_refused_where_it_cannot_run():
    cfg = load_config("configs/stage1_tiny.yaml", ["train.attention=flash"])
    with pytest.raises(ConfigError, match=r"^train.attention=flash runs the flash-attn package's "
                                          r"CUDA kernels, and .*: set train.attention=auto"):
        validate_device(cfg, env={})
