"""megatron-core's optimizer state in model space: one fp32 tensor per parameter and state name.

megatron-core keeps an fp32 master copy of each parameter (bf16 training) and the Adam moments of
that master; with the distributed optimizer each data-parallel rank holds a contiguous flat range
of each parameter only. A checkpoint that reshards freely stores these in the parameter's own
shape. :func:`slots` finds where each parameter's state lives on this rank; :func:`gather` builds
the whole tensor on one data-parallel rank and :func:`scatter` puts a whole tensor back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.comm import group_device

STATES = ("main", "exp_avg", "exp_avg_sq")


@dataclass
class Slot:
    """Where one model parameter's optimizer state lives on this rank."""

    main: torch.Tensor  # fp32 master: the whole parameter, or a flat range of it
    inner: torch.optim.Optimizer  # the torch optimizer keeping the moments of ``main``
    start: int | None = None  # flat range of the parameter (distributed optimizer)
    end: int | None = None

    def tensor(self, name: str) -> torch.Tensor | None:
        if name == "main":
            return self.main
        return self.inner.state[self.main].get(name)


def _pairs(opt):
    """(model parameter, fp32 master, range or None) for one megatron-core optimizer."""
    if hasattr(opt, "model_float16_groups"):  # DistributedOptimizer
        for models, mains in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                              (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for group_models, group_mains in zip(models, mains, strict=True):
                for param, main in zip(group_models, group_mains, strict=True):
                    yield param, main, opt._get_model_param_range_map(param)["param"]
    elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
        for models, mains in ((opt.float16_groups, opt.fp32_from_float16_groups),
                              (opt.fp32_from_fp32_groups, opt.fp32_from_fp32_groups)):
            for group_models, group_mains in zip(models, mains, strict=True):
                for param, main in zip(group_models, group_mains, strict=True):
                    yield param, main, None
    else:  # FP32Optimizer
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                yield param, param, None


def slots(optimizer) -> dict[int, Slot]:
    """``id(model parameter)`` -> its :class:`Slot`, for the parameters this rank updates."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param, main, rng in _pairs(opt):
            out[id(param)] = Slot(main, opt.optimizer, *((rng.start, rng.end) if rng else (None, None)))
    return out


def is_distributed(optimizer) -> bool:
    return any(hasattr(opt, "model_float16_groups")
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def gather(param: torch.nn.Parameter, slot: Slot | None, name: str, dp_group, owner: int,
           distributed: bool) -> torch.Tensor | None:
    """The whole fp32 state ``name`` of ``param`` on DP rank ``owner`` (None elsewhere).

    Every rank of ``dp_group`` calls this for the same parameters in the same order.
    """
    if not distributed:  # every DP rank holds the same whole state
        if dp_group.rank() != owner:
            return None
        value = slot.tensor(name)
        return torch.zeros(param.shape) if value is None else value.detach().float().cpu().clone()
    # every rank reduces, those holding no shard of ``param`` too: the buffer is on the group's
    # device on each of them (NCCL takes no CPU tensor)
    full = torch.zeros(param.numel(), dtype=torch.float32, device=group_device(dp_group))
    if slot is not None and slot.tensor(name) is not None:
        full[slot.start:slot.end] = slot.tensor(name).detach().view(-1).float()
    dist.reduce(full, dst=dist.get_global_rank(dp_group, owner), group=dp_group)
    return full.view(param.shape).cpu() if dp_group.rank() == owner else None


def scatter(slot: Slot, name: str, full: torch.Tensor, step: int) -> None:
    """Put the whole fp32 tensor ``full`` into this rank's share of state ``name``."""
    source = full.reshape(-1)[slot.start:slot.end] if slot.start is not None else full
    if name == "main":
        with torch.no_grad():
            slot.main.view(-1).copy_(source.reshape(-1))
        return
    state = slot.inner.state[slot.main]
    if name not in state:  # torch optimizers create their state lazily at the first step
        state[name] = torch.zeros_like(slot.main)
    state[name].view(-1).copy_(source.reshape(-1))
    state["step"] = torch.tensor(float(step))
