"""Device-side draws (kernels.keyed_random and the draws built on it) against independent
references: the hash in plain Python integers, exact sampling probabilities by enumeration, and
torch.multinomial on the host (the draws' former path)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from dataloaders.synthetic import COLOURS, pattern_video, sample_keys, sample_seed, synthetic_video
from kernels.keyed_random import normal, uniform
from megavideo.models.objectives import hard_negatives, mlm_inputs
from megavideo.models.teachers import attention_guided_mask

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def reference_uniform(key: int, position: int) -> float:
    stream = lowbias32((key >> 32) ^ lowbias32(key & M32))
    bits = lowbias32(lowbias32((position + stream * 0x9E3779B9) & M32) ^ stream)
    return (bits + 0.5) / 2.0**32


def test_uniform_is_the_hash_in_python_integers():
    keys = sample_keys(42, 7, [0, 1, 2**40], "mask")
    assert keys.tolist() == [sample_seed(42, 7, i, "mask") for i in (0, 1, 2**40)]
    u = uniform(keys, (2, 5))
    assert u.shape == (3, 2, 5) and u.dtype == torch.float64
    expected = [[reference_uniform(k, p) for p in range(10)] for k in keys.tolist()]
    assert u.view(3, 10).tolist() == expected


def test_uniform_streams_are_per_key_and_uniform():
    keys = sample_keys(0, 0, list(range(64)), "x")
    u = uniform(keys, (4096,))
    assert torch.equal(uniform(keys[5:6], (4096,))[0], u[5])  # a stream ignores its neighbours
    assert 0.0 < u.min() and u.max() < 1.0
    counts = torch.histc(u.float(), bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40.0  # 15 degrees of freedom: p < 0.001 beyond 37.7
    # neighbouring positions and neighbouring keys are uncorrelated
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]) < 0.02


def inclusion_without_replacement(w: list[float], k: int) -> list[float]:
    """P(item i among k drawn without replacement, each draw proportional to w): enumeration."""
    out = [0.0] * len(w)
    for order in itertools.permutations(range(len(w)), k):
        p, left = 1.0, sum(w)
        for i in order:
            p *= w[i] / left
            left -= w[i]
        for i in order:
            out[i] += p
    return out


def test_attention_guided_mask_has_the_multinomial_inclusion_probabilities():
    w = [0.5, 0.2, 0.15, 0.1, 0.05, 0.0]
    n = 20000
    attention = torch.tensor(w).expand(n, -1)  # one frame per sample
    drawn = attention_guided_mask(attention, 1, 2, sample_keys(3, 0, list(range(n)), "mask"))
    device_rate = torch.bincount(drawn[:, 1:].flatten() - 1, minlength=len(w)) / n
    host = torch.stack([torch.multinomial(torch.tensor(w), 2, generator=torch.Generator()
                                          .manual_seed(i)) for i in range(n)])
    host_rate = torch.bincount(host.flatten(), minlength=len(w)) / n
    exact = torch.tensor(inclusion_without_replacement(w, 2))
    assert device_rate[-1] == 0.0  # zero attention is never drawn
    assert (device_rate - exact).abs().max() < 0.015
    assert (device_rate - host_rate).abs().max() < 0.02


def test_hard_negatives_follow_the_softmax_of_the_other_items():
    n = 20000
    sim = torch.tensor([[3.0, 1.0, 0.5, 0.0, 2.0]]).expand(n, -1)
    idx = torch.zeros(n, dtype=torch.long)
    idx_all = torch.tensor([0, 1, 2, 3, 0])  # rows 0 and 4 are this item
    picks = hard_negatives(sim, idx, idx_all, sample_keys(5, 0, list(range(n)), "vtm"))
    rate = torch.bincount(picks, minlength=5) / n
    exact = torch.softmax(torch.tensor([-float("inf"), 1.0, 0.5, 0.0, -float("inf")]), 0)
    assert rate[0] == 0 and rate[4] == 0
    assert (rate - exact).abs().max() < 0.015
    # every row is this item: any row, uniformly
    alone = hard_negatives(sim[:, :2], idx, torch.zeros(2, dtype=torch.long),
                           sample_keys(5, 0, list(range(n)), "vtm"))
    assert abs(alone.float().mean() - 0.5) < 0.015


def test_mlm_masking_has_bert_rates():
    ids = torch.full((400, 128), 7)
    ids[:, 0] = 2
    special = {"pad": 0, "cls": 2, "mask": 4}
    masked, labels = mlm_inputs(ids, special, 1000, 0.15, sample_keys(1, 2, list(range(400)), "mlm"))
    chosen = labels != -100
    rate = chosen[:, 1:].float().mean()
    assert abs(rate - 0.15) < 0.005 and not chosen[:, 0].any()
    swapped = chosen & (masked != 4) & (masked != 7)
    assert abs((masked[chosen] == 4).float().mean() - 0.8) < 0.015
    assert abs(swapped.sum() / chosen.sum() - 0.1) < 0.01
    assert masked.max() < 1000 and masked.min() >= 0


def test_normal_numbers_and_the_synthetic_clips_drawn_from_them():
    keys = sample_keys(0, 3, list(range(16)), "video")
    z = normal(keys, 8192)
    assert z.dtype == torch.float32 and z.shape == (16, 8192)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs((z.abs() < 1.0).float().mean() - 0.6827) < 0.005  # P(|z| < 1)
    clips = synthetic_video(functools.partial(normal, keys), frames=4, size=16)
    assert clips.shape == (16, 3, 4, 16, 16)
    alone = synthetic_video(functools.partial(normal, keys[7:8]), frames=4, size=16)
    assert torch.equal(alone[0], clips[7])  # a clip depends on its own sample only
    patterns = pattern_video(functools.partial(normal, keys[:2]), [0, 7], frames=4, size=8)
    noise = normal(keys[:2], 3 * 4 * 8 * 8).view(2, 3, 4, 8, 8)
    red, green = torch.tensor(COLOURS["red"]), torch.tensor(COLOURS["green"])
    assert torch.equal(patterns[1, :, 0], green[:, None, None] + 0.5 * noise[1, :, 0])
    assert torch.equal(patterns[0, :, 3], red[:, None, None] + 0.5 * noise[0, :, 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uniform_is_the_same_on_cuda():
    keys = sample_keys(42, 7, list(range(8)), "mask")
    assert torch.equal(uniform(keys.cuda(), (3, 100)).cpu(), uniform(keys, (3, 100)))
