"""Rank code of the FLOP-accounting test: one step of each case counted by PyTorch's
FlopCounterMode, on one rank at tp 1 / pp 1."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from megavideo.config import load_config

# the stage's method that makes the synthetic inputs (no model in it): stage 2's computes the
# audio filterbanks, whose mel matmul is data preparation, not the model's
DATA = {1: "_clips", 2: "_synthetic", 3: "_source"}


def _conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                   transposed, output_padding, groups, output_mask, out_shape=None) -> int:
    """FlopCounterMode's convolution backward, with the weight gradient of a grouped convolution
    (BEATs' position convolution) counted once, not ``groups`` times: torch's formula leaves
    the groups out there."""
    from torch.utils.flop_counter import conv_backward_flop, conv_flop_count

    count = conv_backward_flop.__wrapped__(
        grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
        output_padding, groups, output_mask, out_shape)
    if output_mask[1] and groups > 1 and not transposed:
        def t(shape):
            return [shape[1], shape[0], *shape[2:]]

        weight_grad = conv_flop_count(t(x_shape), t(grad_out_shape), t(w_shape))
        count -= weight_grad - weight_grad // groups
    return count


def _counted_apart(stage, name: str, data_flops: list[int]) -> None:
    """Count the FLOPs of ``stage.<name>`` in a nested counter too, so they can be taken out."""
    original = getattr(stage, name)

    def run(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            out = original(*args, **kwargs)
        data_flops.append(inner.get_total_flops())
        return out

    setattr(stage, name, run)


def step_count(config: str, overrides: list[str]) -> dict[str, int]:
    """The FLOPs FlopCounterMode sees in one ``Trainer.forward_backward`` (teachers included),
    less the synthetic data's."""
    from megavideo.training.loop import Trainer  # imported in the rank only: megatron-core is slow to import

    trainer = Trainer(load_config(config, overrides))
    data_flops: list[int] = []
    _counted_apart(trainer.stage, "_captions" if getattr(trainer.cfg.model, "substage", "") == "align"
                   else DATA[trainer.cfg.stage], data_flops)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        trainer.forward_backward(0)
    total = counter.get_total_flops()
    return {"total": total, "data": sum(data_flops), "model": total - sum(data_flops)}


def measure(rank: int, world: int, cases: dict[str, tuple[str, list[str]]], out: str) -> None:
    torch.save({name: step_count(config, overrides) for name, (config, overrides) in cases.items()},
               out)
