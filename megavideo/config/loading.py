"""Loading a run config: YAML files under ``configs/``, presets, dotted ``key=value`` overrides.

``model.preset`` names a model preset (``configs/models/<preset>.yaml``) whose values sit under the
run file's own ``model`` keys, which sit under the command-line overrides. Every error is raised as
:class:`~megavideo.config.schema.ConfigError` with one sentence, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from megavideo.config.schema import Config, ConfigError
from megavideo.config.validation import validate

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level.")
    return data


def parse_overrides(items: list[str]) -> dict:
    """``["parallel.tp=2", "train.steps=5"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value.")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key below a value.")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return tree


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        (inner,) = typing.get_args(hint)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{where} must be of type {hint.__name__}, got {value!r}.")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{where}.{key}' (known: {', '.join(sorted(names))})."
            )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}"
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


def _preset_file(name: str, kind: str, config_dir: Path) -> dict:
    for directory in (config_dir / "models", CONFIG_DIR / "models"):
        path = directory / f"{name}.yaml"
        if path.is_file():
            return _read_yaml(path)
    raise ConfigError(f"unknown {kind} preset '{name}' (no file models/{name}.yaml).")


def _resolve_preset(raw: dict, config_dir: Path) -> dict:
    """``model.preset`` names a whole model file (its ``model`` mapping); ``model.text.preset``,
    ``model.audio.preset`` and ``model.llm.preset`` name a file of that part (its ``text``,
    ``audio`` or ``llm`` mapping). The run's own
    keys sit over the preset's."""
    model = raw.get("model", {})
    if not isinstance(model, dict):
        return raw
    if model.get("preset"):
        preset = _preset_file(model["preset"], "model", config_dir)
        model = _merge(preset.get("model", preset), model)
    for section in ("text", "audio", "llm", "qformer"):
        sub = model.get(section)
        if isinstance(sub, dict) and sub.get("preset"):
            preset = _preset_file(sub["preset"], section, config_dir)
            model = {**model, section: _merge(preset.get(section, preset), sub)}
    return {**raw, "model": model}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config, apply the preset and the overrides, validate the result."""
    raw: dict = {}
    config_dir = CONFIG_DIR
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        config_dir = path.resolve().parent
    raw = _merge(raw, parse_overrides(list(overrides)))
    raw = _resolve_preset(raw, config_dir)
    config = _build(Config, raw, "config")
    validate(config)
    return config



def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

