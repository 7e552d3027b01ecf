"""Run-time detection of the optional GPU stack, with one log line per decision.

transformer-engine, flash-attn and apex are optional extras (the NGC PyTorch container ships them).
Each is detected by importing it; when one is missing the named fallback runs and the log says so.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken binary raising OSError/RuntimeError
        return False, f"{type(err).__name__}: {err}".splitlines()[0]
    return True, ""


@dataclass(frozen=True)
class Backends:
    cuda: bool
    transformer_engine: bool
    apex: bool
    flash_attn: bool
    reasons: tuple[tuple[str, str], ...] = ()

    def reason(self, name: str) -> str:
        return dict(self.reasons).get(name, "")


@functools.cache
def detect() -> Backends:
    """What is importable in this process (cached)."""
    found, reasons = {}, []
    for name, module in (("transformer_engine", "transformer_engine.pytorch"),
                         ("apex", "apex"), ("flash_attn", "flash_attn")):
        ok, why = _importable(module)
        found[name] = ok
        if not ok:
            reasons.append((name, why))
    return Backends(cuda=torch.cuda.is_available(), reasons=tuple(reasons), **found)


@functools.cache
def layer_backend() -> str:
    """``"te"`` (Transformer Engine layer spec) on a GPU with TE importable, else ``"local"``."""
    found = detect()
    if found.cuda and found.transformer_engine:
        log.info("transformer blocks: Transformer Engine spec (fused LayerNorm-linear, TE attention)")
        return "te"
    why = "no CUDA device" if not found.cuda else found.reason("transformer_engine")
    log.info("transformer blocks: megatron-core local spec (Transformer Engine not used: %s)", why)
    return "local"
