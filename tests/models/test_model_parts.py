"""The ViT's pieces against the paper's and the official code's definitions (one process, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernels.fused import residual_reference
from megavideo.models.embedding import interpolate_frames, num_visible, sincos_3d
from megavideo.models.layers import FullWidthQKNorm, LayerScale, drop_path_keep
from megavideo.models.teachers import attention_guided_mask
from parallel.layout import chunks_of, megatron_layout, padded_heads, split_layers


def _official_sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _official_sincos_3d(dim: int, grid_size: int, t_size: int) -> np.ndarray:
    """InternVideo2's pos_embed.get_3d_sincos_pos_embed(cls_token=True), as written there."""
    dim_s, dim_t = dim // 4 * 3, dim // 4
    grid = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    spatial = np.concatenate([_official_sincos_1d(dim_s // 2, grid[0]),
                              _official_sincos_1d(dim_s // 2, grid[1])], axis=1)
    temporal = _official_sincos_1d(dim_t, np.arange(t_size, dtype=np.float64))
    temporal = np.repeat(temporal[:, None, :], grid_size**2, axis=1)
    spatial = np.repeat(spatial[None], t_size, axis=0)
    table = np.concatenate([temporal, spatial], axis=-1).reshape([-1, dim])
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


@pytest.mark.parametrize(("dim", "grid", "frames"), [(80, 4, 2), (1408, 16, 8), (3200, 16, 4)])
def test_sincos_3d_matches_the_official_table(dim, grid, frames):
    ours = sincos_3d(dim, grid, frames, cls_token=True)
    assert ours.shape == (1 + frames * grid * grid, dim) and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), torch.from_numpy(_official_sincos_3d(dim, grid, frames)),
                          atol=1e-6)


def test_interpolate_frames_keeps_cls_and_resamples_time():
    frames, grid, dim = 4, 2, 16
    table = sincos_3d(dim, grid, frames, cls_token=True)
    assert torch.equal(interpolate_frames(table, frames, frames, cls_token=True), table)
    doubled = interpolate_frames(table, frames, 8, cls_token=True)
    assert doubled.shape == (1 + 8 * grid * grid, dim)
    assert torch.equal(doubled[0], table[0])
    # linear in time: a table that is linear in t stays linear; the spatial channels do not move
    per_frame = doubled[1:].view(8, grid * grid, dim)
    original = table[1:].view(frames, grid * grid, dim)
    spatial = slice(dim // 4, dim)
    assert torch.allclose(per_frame[:, :, spatial], original[:1, :, spatial].expand(8, -1, -1))
    ramp = torch.arange(frames, dtype=torch.float32).repeat_interleave(grid * grid)[:, None].expand(-1, dim)
    resampled = interpolate_frames(ramp, frames, 2, cls_token=False).view(2, grid * grid, dim)
    assert torch.allclose(resampled[:, 0, 0], torch.tensor([0.5, 2.5]))


def test_attention_guided_mask_follows_the_attention_and_the_seed():
    frames, patches, visible = 3, 16, 4
    attention = torch.rand(2 * frames, patches)  # the per-frame CLIP teacher's pool attention
    attention[:, ::2] = 0.0  # odd patches only can be drawn

    def draw(seed):
        return attention_guided_mask(attention, frames, visible, torch.tensor([seed, seed + 1]))

    index = draw(0)
    assert index.shape == (2, 1 + frames * visible) and index.dtype == torch.long
    assert (index[:, 0] == 0).all()
    assert (index[:, 1:].diff(dim=1) > 0).all()  # sorted, no repeats
    tokens = index[:, 1:] - 1
    assert ((tokens % patches) % 2 == 1).all()
    for row in tokens:
        assert (row.div(patches, rounding_mode="floor").bincount(minlength=frames) == visible).all()
    assert torch.equal(draw(0), index)
    assert not torch.equal(draw(100), index)
    # one stream per sample: sample 1's draw does not depend on what sample 0 drew
    alone = attention_guided_mask(attention[frames:], frames, visible, torch.tensor([1]))
    assert torch.equal(alone[0], index[1])


def test_official_visible_count():
    assert num_visible(256, 0.8) == 52 and 1 + 8 * num_visible(256, 0.8) == 417


def test_drop_path_drops_whole_samples_and_rescales():
    u = torch.tensor([0.1, 0.95, 0.5, 0.89])
    keep = drop_path_keep(u, rate=0.1, training=True, dtype=torch.float32)
    assert torch.equal(keep, torch.tensor([1.0, 0.0, 1.0, 1.0]) / 0.9)
    assert drop_path_keep(u, rate=0.1, training=False, dtype=torch.float32) is None
    assert drop_path_keep(None, rate=0.1, training=True, dtype=torch.float32) is None
    x, out = torch.ones(3, 4, 2), torch.full((3, 4, 2), 2.0)  # [s, b, h]
    expected = 1.0 + 2.0 * keep.view(1, -1, 1).expand_as(x)
    assert torch.equal(residual_reference(x, out, None, None, keep), expected)


def test_layer_scale_stays_fp32_under_a_bf16_cast():
    ls = LayerScale(4, 1e-5, sequence_parallel=False)
    with torch.no_grad():
        ls.gamma.copy_(torch.tensor([1e-5, 1.0001, 3.0, -2e-6]))
    exact = ls.gamma.detach().clone()
    ls = ls.bfloat16()
    assert ls.gamma.dtype == torch.float32 and torch.equal(ls.gamma.detach(), exact)
    x = torch.randn(2, 4).bfloat16()
    out = residual_reference(torch.zeros_like(x), x, None, ls.gamma, None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.float() * exact).bfloat16())


def test_qk_norm_spans_the_full_width_not_each_head():
    heads, head_dim = 5, 8
    config = SimpleNamespace(num_attention_heads=heads, real_attention_heads=heads, kv_channels=head_dim,
                             params_dtype=torch.float32, fused_qk_norm=False)
    norm = FullWidthQKNorm(config, head_dim)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(7, 2, heads, head_dim)
    flat = x.reshape(7, 2, heads * head_dim)
    expected = norm.weight * flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x).reshape(7, 2, -1), expected, atol=1e-6)
    per_head = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert not torch.allclose(norm(x) / norm.weight.view(heads, head_dim), per_head, atol=1e-3)


def test_qk_norm_ignores_zero_padding_heads():
    real, padded, head_dim = 5, 8, 4
    config = SimpleNamespace(num_attention_heads=padded, real_attention_heads=real, kv_channels=head_dim,
                             params_dtype=torch.float32, fused_qk_norm=False)
    x = torch.randn(3, 2, padded, head_dim)
    x[:, :, real:] = 0.0
    out = FullWidthQKNorm(config, head_dim)(x)
    unpadded = SimpleNamespace(num_attention_heads=real, real_attention_heads=real, kv_channels=head_dim,
                               params_dtype=torch.float32, fused_qk_norm=False)
    assert torch.allclose(out[:, :, :real], FullWidthQKNorm(unpadded, head_dim)(x[:, :, :real]))
    assert (out[:, :, real:] == 0).all()


@pytest.mark.parametrize(
    ("layers", "pp", "vpp", "counts"),
    [
        (48, 4, 1, [12, 12, 12, 12]),
        (6, 4, 1, [1, 1, 2, 2]),  # the extra layers go to the last stages, never to the first
        (40, 3, 1, [13, 13, 14]),
        (7, 2, 2, [1, 2, 2, 2]),
        (4, 4, 1, [1, 1, 1, 1]),
    ],
)
def test_pipeline_split_rule(layers, pp, vpp, counts):
    assert split_layers(layers, pp, vpp) == counts
    assert sum(counts) == layers


def test_interleaved_chunks_and_explicit_layout():
    counts = split_layers(7, 2, 2)  # virtual stages 0..3 hold 1, 2, 2, 2 layers
    rank0, rank1 = chunks_of(0, counts, 2), chunks_of(1, counts, 2)
    assert [list(c.layers) for c in rank0] == [[0], [3, 4]]
    assert [list(c.layers) for c in rank1] == [[1, 2], [5, 6]]
    assert rank0[0].is_first and not rank0[1].is_first and rank1[1].is_last
    assert split_layers(6, 2, 1, explicit=[1, 5]) == [1, 5]
    assert megatron_layout([1, 2], 2) == [["embedding", "decoder"], ["decoder", "decoder", "loss"]]


@pytest.mark.parametrize(("heads", "tp", "padded"), [(25, 1, 25), (25, 2, 26), (25, 4, 28), (25, 8, 32),
                                                      (16, 8, 16), (5, 4, 8)])
def test_head_padding_to_a_multiple_of_tp(heads, tp, padded):
    assert padded_heads(heads, tp) == padded
