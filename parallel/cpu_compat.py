"""Run megatron-core 0.16.1 on CPU with the gloo backend.

megatron-core hard-codes CUDA in about 570 lines (buffers on ``torch.cuda.current_device()``,
``device="cuda"`` literals, ``Tensor.cuda()``, the CUDA RNG tracker, ``torch.cuda.synchronize()``,
``param.type() == "torch.cuda.FloatTensor"`` checks). Instead of patching each call site, this
module redirects CUDA to the CPU while :func:`redirected` is entered:

- a :class:`torch.overrides.TorchFunctionMode` that rewrites ``device="cuda"`` arguments,
  ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU and reports CPU tensors' ``type()`` as the
  matching ``torch.cuda.*Tensor`` string;
- ``torch.cuda.current_device`` returning ``"cpu"`` and a no-op ``torch.cuda.synchronize``;
- the CUDA RNG (and megatron's RNG-state tracker built on it) mapped onto the CPU generator.

It is entered only when CUDA is unavailable: by :func:`parallel.distributed.init_distributed` for
the life of the process group (:func:`parallel.distributed.shutdown` leaves it) and by
``single_rank_world`` for its block. Leaving restores every attribute it replaced. An attribute it
replaces that the installed torch or megatron-core no longer has is a :class:`CompatError` naming
it, before anything is patched. Nothing outside ``parallel/`` needs to know about it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)


class CompatError(RuntimeError):
    """The installed torch or megatron-core lacks an attribute the CPU redirection replaces."""


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


def _replacements() -> list[tuple[object, str, Callable]]:
    """(owner, attribute, its CPU stand-in) for everything the redirection replaces."""
    from megatron.core.tensor_parallel import random as mcore_random

    return [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "synchronize", lambda *_args, **_kwargs: None),
        (torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed))),
        (torch.cuda, "get_rng_state", _cpu_rng_state),
        (torch.cuda, "set_rng_state", _set_cpu_rng_state),
        (torch.cuda.random, "get_rng_state", _cpu_rng_state),
        (torch.cuda, "stream", lambda *_args, **_kwargs: contextlib.nullcontext()),
        (mcore_random, "_get_cuda_rng_state", _cpu_rng_state),
        (mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state),
    ]


_depth = 0  # how many redirected() blocks are open in this process


@contextlib.contextmanager
def redirected() -> Iterator[bool]:
    """Redirect CUDA to the CPU inside the block if CUDA is unavailable; yields whether it is
    active. Re-entrant: an inner block inside an active one changes nothing."""
    global _depth
    if torch.cuda.is_available():
        yield False
        return
    if _depth:
        _depth += 1
        try:
            yield True
        finally:
            _depth -= 1
        return
    replacements = _replacements()
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in replacements
               if not hasattr(owner, name)]
    if missing:
        raise CompatError(f"parallel.cpu_compat replaces {', '.join(missing)}, which this "
                          f"torch {torch.__version__} / megatron-core no longer has.")
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, stand_in in replacements:
        setattr(owner, name, stand_in)
    rng_log = logging.getLogger(replacements[-1][0].__name__)
    quiet = _ExpectedRngWarning()
    rng_log.addFilter(quiet)
    mode = _CudaOnCpu()
    mode.__enter__()
    _depth = 1
    log.info("CUDA unavailable: megatron-core runs on the CPU through parallel.cpu_compat")
    try:
        yield True
    finally:
        _depth = 0
        mode.__exit__(None, None, None)
        rng_log.removeFilter(quiet)
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def active() -> bool:
    """Whether the redirection is on in this process."""
    return _depth > 0
