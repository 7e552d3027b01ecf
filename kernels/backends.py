"""Run-time detection of the optional GPU stack, with one log line per decision.

transformer-engine, flash-attn and apex are optional extras (the NGC PyTorch container ships them).
Each is detected by importing it; when one is missing the named fallback runs and the log says so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from packaging.version import Version

log = logging.getLogger(__name__)

# the Transformer Engine releases megatron-core 0.16.1 was released against (its own ``dev`` extra:
# transformer-engine>=2.9.0a0,<2.12.0); others may work, and the start-up line says which runs
TE_TESTED = (Version("2.9.0a0"), Version("2.12.0"))
LAYER_BACKENDS = ("local", "te")


def _importable(module: str) -> tuple[bool, str, str]:
    """(importable, why not, its ``__version__``)."""
    try:
        found = importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken binary raising OSError/RuntimeError
        return False, f"{type(err).__name__}: {err}".splitlines()[0], ""
    root = module.split(".")[0]
    version = getattr(found, "__version__", None) or getattr(importlib.import_module(root),
                                                             "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(root)
        except importlib.metadata.PackageNotFoundError:
            version = ""
    return True, "", str(version)


def importable(module: str) -> bool:
    """Whether ``module`` imports in this process."""
    return _importable(module)[0]


@dataclass(frozen=True)
class Backends:
    cuda: bool
    transformer_engine: bool
    apex: bool
    flash_attn: bool
    reasons: tuple[tuple[str, str], ...] = ()
    versions: tuple[tuple[str, str], ...] = ()

    def reason(self, name: str) -> str:
        return dict(self.reasons).get(name, "")

    def version(self, name: str) -> str:
        return dict(self.versions).get(name, "")

    def summary(self) -> str:
        """One line: which of the GPU stack this process has, with versions."""
        parts = [f"CUDA {torch.version.cuda}" if self.cuda else "no CUDA device"]
        for name, label in (("transformer_engine", "transformer-engine"),
                            ("flash_attn", "flash-attn"), ("apex", "apex")):
            if getattr(self, name):
                parts.append(f"{label} {self.version(name) or '(version unknown)'}")
            else:
                parts.append(f"no {label}")
        return ", ".join(parts)

    def te_untested(self) -> str:
        """Why this process's Transformer Engine is outside the tested range, or ''."""
        if not self.transformer_engine or not self.version("transformer_engine"):
            return ""
        version = Version(self.version("transformer_engine"))
        low, high = TE_TESTED
        if low <= version < high:
            return ""
        return (f"transformer-engine {version} is outside the range megatron-core 0.16.1 was "
                f"released against (>={low},<{high})")


@functools.cache
def detect() -> Backends:
    """What is importable in this process (cached)."""
    found, reasons, versions = {}, [], []
    for name, module in (("transformer_engine", "transformer_engine.pytorch"),
                         ("apex", "apex"), ("flash_attn", "flash_attn")):
        ok, why, version = _importable(module)
        found[name] = ok
        if ok:
            versions.append((name, version))
        else:
            reasons.append((name, why))
    return Backends(cuda=torch.cuda.is_available(), reasons=tuple(reasons),
                    versions=tuple(versions), **found)


_forced: list[str] = []


@contextlib.contextmanager
def use_layer_backend(name: str) -> Iterator[None]:
    """Build models with the ``name`` spec inside (``local`` or ``te``), whatever this process
    would choose: tools that build on the meta device use the local spec, where every parameter
    has its tensor-parallel layout at once (TE defers it until the weights are materialised) and
    the canonical names."""
    if name not in LAYER_BACKENDS:
        raise ValueError(f"unknown layer backend {name!r} (known: {', '.join(LAYER_BACKENDS)})")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


@functools.cache
def detected_layer_backend() -> str:
    """The spec this process runs by itself (cached; logged once)."""
    found = detect()
    if found.cuda and found.transformer_engine:
        log.info("transformer blocks: Transformer Engine spec (fused LayerNorm-linear, TE attention)")
        untested = found.te_untested()
        if untested:
            log.warning("%s", untested)
        return "te"
    why = "no CUDA device" if not found.cuda else found.reason("transformer_engine")
    log.info("transformer blocks: megatron-core local spec (Transformer Engine not used: %s)", why)
    return "local"


def layer_backend() -> str:
    """``"te"`` (Transformer Engine layer spec) on a GPU with TE importable, else ``"local"``;
    inside :func:`use_layer_backend`, the backend it names."""
    return _forced[-1] if _forced else detected_layer_backend()
