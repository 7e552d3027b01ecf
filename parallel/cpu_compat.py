"""Run megatron-core 0.16.1 on CPU with the gloo backend.

megatron-core hard-codes CUDA in about 570 lines (buffers on ``torch.cuda.current_device()``,
``device="cuda"`` literals, ``Tensor.cuda()``, the CUDA RNG tracker, ``torch.cuda.synchronize()``,
``param.type() == "torch.cuda.FloatTensor"`` checks). Instead of patching each call site, this
module redirects CUDA to the CPU process-wide:

- a :class:`torch.overrides.TorchFunctionMode` that rewrites ``device="cuda"`` arguments,
  ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU and reports CPU tensors' ``type()`` as the
  matching ``torch.cuda.*Tensor`` string;
- ``torch.cuda.current_device`` returning ``"cpu"`` and a no-op ``torch.cuda.synchronize``;
- the CUDA RNG (and megatron's RNG-state tracker built on it) mapped onto the CPU generator.

It is applied by :func:`apply` only when CUDA is unavailable, once per process, and logged.
Nothing outside ``parallel/`` needs to know about it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_MODE: TorchFunctionMode | None = None


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaOnCpu(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made in the process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


class _ExpectedRngWarning(logging.Filter):
    """With the CUDA RNG mapped onto the CPU generator, the tracker's check that the CPU state is
    untouched inside a fork always fires (the fork *is* the CPU state): drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply() -> bool:
    """Apply the CPU redirection if CUDA is unavailable; returns whether it is active."""
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is not None:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *_args, **_kwargs: None
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.stream = lambda *_args, **_kwargs: contextlib.nullcontext()
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state

    logging.getLogger(mcore_random.__name__).addFilter(_ExpectedRngWarning())

    _MODE = _CudaOnCpu()
    _MODE.__enter__()
    log.info("CUDA unavailable: megatron-core runs on the CPU through parallel.cpu_compat")
    return True
