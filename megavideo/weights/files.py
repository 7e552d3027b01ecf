"""Reading released weights: safetensors files, PyTorch state dicts, folders of either.

:func:`open_weights` opens what a user points at, one tensor read at a time where the format allows:

- a folder: its ``*.safetensors`` files, else its ``*.bin``/``*.pt``/``*.pth`` files (a Hugging Face
  model folder, possibly sharded);
- a ``.safetensors`` file (read lazily);
- a PyTorch file (memory-mapped): a state dict, or one under ``model``/``module``/``state_dict``
  (the official InternVideo2 and BEATs files), with what else the file holds in ``extra``
  (BEATs' ``cfg``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
STATE_KEYS = ("module", "model", "state_dict")


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A PyTorch file's state dict (the one under ``module``/``model``/``state_dict`` where the
    file nests it) and the file's other top-level entries."""
    obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    for key in STATE_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key], {k: v for k, v in obj.items() if k != key}
    return obj, {}


@dataclass
class Weights:
    """The tensors of one released checkpoint, by key; ``extra``: a PyTorch file's other entries."""

    path: Path
    where: dict[str, Path] = field(default_factory=dict)  # safetensors key -> file
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # PyTorch files' tensors
    extra: dict = field(default_factory=dict)

    def keys(self) -> set[str]:
        return set(self.where) | set(self.loaded)

    def __contains__(self, key: str) -> bool:
        return key in self.where or key in self.loaded

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.loaded:
            return self.loaded[key]
        if key not in self.where:
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(str(self.where[key]), "pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.keys()))


def weight_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint file or folder (safetensors preferred)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder.")
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.safetensors")) or sorted(
        f for f in path.iterdir() if f.suffix in TORCH_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no .safetensors, .bin, .pt or .pth file.")
    return files


def open_weights(path: str | Path) -> Weights:
    """The tensors of a checkpoint file or folder (see the module docstring)."""
    out = Weights(Path(path))
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                out.where.update(dict.fromkeys(f.keys(), file))
        else:
            state, extra = load_state_dict(file)
            out.loaded.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
            out.extra.update(extra)
    return out


__all__ = ["Weights", "load_state_dict", "open_weights", "weight_files"]
