"""kernels.fused: the compiled element-wise chains against their eager references (which are
today's ops, see tests/models/test_model_parts.py), forward and backward, on the CPU."""

from __future__ import annotations

import pytest
import torch

from kernels import fused


def _grads(fn, inputs: list[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in inputs]
    out = fn(*leaves)
    (out.float().square().sum()).backward()
    return out.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


def _close(got: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert (got.float() - expected.float()).abs().max() <= bound * expected.float().abs().max()


# two variants per dtype: torch.compile guards on which inputs need a gradient, and each
# combination is a graph of its own (8 at most: the training step has two, bf16 and no-grad)
@pytest.mark.parametrize("parts", ["all", "none"])
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_the_residual_chain_is_one_kernel_of_the_same_numbers(parts, dtype, bound):
    """fp32: the same numbers (measured: equal; the q/k norm 1.1e-7 of the largest value); bf16:
    the compiled kernel keeps the intermediate sums in fp32, so within one bf16 rounding
    (measured: 4.5e-3 of the largest value; the q/k norm 6.9e-3)."""
    g = torch.Generator().manual_seed(0)
    s, b, h = 9, 3, 32
    x, out = (torch.randn(s, b, h, generator=g).to(dtype) for _ in range(2))
    bias = None if parts == "none" else torch.randn(h, generator=g).to(dtype)
    gamma = None if parts == "none" else torch.rand(h, generator=g) + 0.5
    keep = None if parts == "none" else (torch.tensor([1.0, 0.0, 1.0]) / 0.9).to(dtype)
    inputs = [x, out, bias, gamma, keep]
    expected, expected_grads = _grads(fused.residual_reference, inputs)
    got, got_grads = _grads(fused.residual, inputs)
    _close(got, expected, bound)
    for grad, reference in zip(got_grads, expected_grads, strict=True):
        assert (grad is None) == (reference is None)
        if reference is not None:
            _close(grad, reference, 4 * bound)


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_the_qk_norm_halves_are_the_same_numbers(dtype, bound):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 4, 8, generator=g).to(dtype)  # [s, b, heads, head_dim]
    weight = (torch.rand(4, 8, generator=g) + 0.5).to(dtype)
    sum_sq = fused.sum_squares(x)
    reference = fused.sum_squares_reference(x)
    assert sum_sq.dtype == torch.float32 and sum_sq.shape == (7, 2, 1, 1)
    _close(sum_sq, reference, 1e-6)

    def norm(x, weight, fn_sum, fn_scale, cast):
        y = x.float() if cast else x  # the eager path casts once, for both halves
        return fn_scale(y, fn_sum(y), weight, 40, 1e-6, x.dtype)  # width 40: other ranks' heads

    expected, expected_grads = _grads(
        lambda x, w: norm(x, w, fused.sum_squares_reference, fused.rms_scale_reference, True),
        [x, weight])
    got, got_grads = _grads(lambda x, w: norm(x, w, fused.sum_squares, fused.rms_scale, False),
                            [x, weight])
    _close(got, expected, bound)
    for grad, reference in zip(got_grads, expected_grads, strict=True):
        _close(grad, reference, 4 * bound)
