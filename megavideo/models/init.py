"""Initial weights that depend on the seed alone, not on the layout.

A module built on one rank of a tensor- and pipeline-parallel layout draws its random initial
weights from that rank's RNG stream, in that rank's order, at its shard's shape: the same seed
gives other weights at another layout. Here every random initialiser is remembered on its parameter
(:func:`recorded`, :func:`init_with`), and :func:`initialize` replays each one on the whole
(single-rank) tensor, seeded by the seed and the parameter's canonical name, keeping this rank's
shard. Torch's own layers (``nn.Linear``, ``nn.ConvNd``, ``nn.Embedding``) replay their
``reset_parameters``; a module whose parameters depend on each other (a weight-normed convolution)
defines ``reset_seeded()``. Everything else (zeros, ones, constants, sin-cos tables) is the same at
every layout already. No rank holds more than one whole parameter at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from parallel.tensors import take_shard, whole_shape

INIT_STD = 0.02  # trunc_normal(std=0.02) in the official code: the truncation at +-2 never bites

Initializer = Callable[[torch.Tensor], object]
_BUILTINS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def recorded(fn: Initializer) -> Initializer:
    """``fn`` as an ``init_method`` that remembers itself on the parameter it initialises."""

    def init(tensor: torch.Tensor):
        if isinstance(tensor, nn.Parameter):
            tensor.init_fn = fn
        return fn(tensor)

    init.__name__ = getattr(fn, "__name__", "init")
    return init


def init_with(param: nn.Parameter, fn: Initializer) -> nn.Parameter:
    """Initialise ``param`` with ``fn`` and remember it (for :func:`initialize`)."""
    return recorded(fn)(param)


def _normal(tensor: torch.Tensor) -> torch.Tensor:
    return nn.init.normal_(tensor, mean=0.0, std=INIT_STD)


init_normal = recorded(_normal)  # megatron-core's init_method for every linear


def seed_of(seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a canonical name, the same in every process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (and ``device``'s) seeded with ``seed`` inside, as it was after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def initialize(named: Iterable[tuple[str, nn.Parameter]], modules: Iterable[nn.Module],
               seed: int, tp_rank: int, tp: int) -> None:
    """Re-draw every random initial weight of ``modules`` from ``seed``, as on one rank.

    ``named`` gives each parameter's canonical (layout-independent) name; a parameter's
    ``tp_coords`` overrides this rank's (TP rank, TP size) where it has its own (stage 3's
    video encoder)."""
    names = {id(param): name for name, param in named}
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                key = next((names[id(p)] for p in sub.parameters() if id(p) in names), None)
                if key is None:
                    continue
                redraw = getattr(sub, "reset_seeded", None)
                if redraw is None and type(sub) in _BUILTINS:
                    redraw = sub.reset_parameters
                if redraw is not None:
                    device = next(sub.parameters()).device
                    with _seeded(seed_of(seed, f"{type(sub).__name__}:{key}"), device):
                        redraw()
            for param in module.parameters():
                fn = getattr(param, "init_fn", None)
                if fn is None or id(param) not in names:
                    continue
                rank, size = getattr(param, "tp_coords", (tp_rank, tp))
                whole = torch.empty(whole_shape(param, size), dtype=torch.float32,
                                    device=param.device)
                with _seeded(seed_of(seed, names[id(param)]), param.device):
                    fn(whole)
                param.copy_(take_shard(param, whole, rank, size))


def normal_linear(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` with BERT's init: weight ~ N(0, 0.02), zero bias (both remembered)."""
    linear = nn.Linear(n_in, n_out, dtype=dtype)
    init_with(linear.weight, _normal)
    init_with(linear.bias, nn.init.zeros_)
    return linear
