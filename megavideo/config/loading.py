"""Loading a run config on OmegaConf: YAML files under ``configs/``, presets, dotted ``key=value``
overrides, merged onto the dataclass schema as a structured config (OmegaConf checks every key
and type) and returned as the dataclasses themselves.

Precedence, lowest first: the schema's defaults, the model preset named by ``model.preset``
(``configs/models/<preset>.yaml``; a preset holds every stage's parts and a stage takes the keys of
its own model section), the run file, the overrides. Every error is raised as
:class:`~megavideo.config.schema.ConfigError` with one sentence, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml
from omegaconf import BooleanNode, DictConfig, FloatNode, IntegerNode, ListConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megavideo.config.schema import MODEL_SECTIONS, Config, ConfigError
from megavideo.config.validation import validate

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
SUB_PRESETS = ("text", "audio", "llm", "qformer")  # model parts with presets of their own


def _read_yaml(path: Path) -> DictConfig:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level.")
    return OmegaConf.create(data)


def parse_overrides(items: list[str]) -> DictConfig:
    """``["parallel.tp=2", "train.steps=5"]`` -> a nested config, values parsed as YAML; an empty
    value is the empty string."""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value.")
    try:
        return OmegaConf.from_dotlist([item + "''" if item.endswith("=") else item
                                       for item in items])
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {' '.join(items)}: {_first_line(err)}.") from None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__


def _preset(name: str, kind: str, config_dir: Path) -> DictConfig:
    for directory in (config_dir / "models", CONFIG_DIR / "models"):
        path = directory / f"{name}.yaml"
        if path.is_file():
            data = _read_yaml(path)
            return data.get(kind, data)
    raise ConfigError(f"unknown {kind} preset '{name}' (no file models/{name}.yaml).")


def _stage(user: DictConfig) -> int:
    stage = user.get("stage", 1)
    if isinstance(stage, bool) or stage not in MODEL_SECTIONS:
        raise ConfigError(f"stage must be 1, 2 or 3, got {stage!r}.")
    return stage


def _model_presets(user: DictConfig, stage: int, config_dir: Path) -> DictConfig:
    """The presets ``model.preset`` and ``model.<part>.preset`` name, as one ``model`` mapping
    under the run's own keys: the model file's keys of this stage's section, each part file's
    mapping under its part."""
    model = user.get("model")
    if not isinstance(model, DictConfig):
        return OmegaConf.create({})
    fields = {f.name for f in dataclasses.fields(MODEL_SECTIONS[stage])}
    out = OmegaConf.create({})
    if model.get("preset"):
        whole = _preset(model.preset, "model", config_dir)
        out = OmegaConf.create({k: v for k, v in whole.items() if k in fields})
    for part in SUB_PRESETS:
        sub = model.get(part)
        if isinstance(sub, DictConfig) and sub.get("preset"):
            out[part] = OmegaConf.merge(out.get(part, {}), _preset(sub.preset, part, config_dir))
    return OmegaConf.create({"model": out})


EXPECTED = {IntegerNode: "of type int", FloatNode: "of type float", StringNode: "of type str",
            BooleanNode: "true or false", ListConfig: "a list"}  # a node's kind, in words


def _expected(err: ValidationError) -> str | None:
    """What the rejected value had to be: its node's kind, or a list's element type."""
    for node, what in EXPECTED.items():
        if isinstance(err.child_node, node):
            return what
    if typing.get_origin(err.ref_type) is list:
        (inner,) = typing.get_args(err.ref_type)
        return f"of type {inner.__name__}"
    return None


def _schema_error(err: OmegaConfBaseException, stage: int) -> ConfigError:
    """OmegaConf's multi-line error as one sentence."""
    key, node = err.full_key, err.object_type
    if isinstance(err, ConfigKeyError) and node is not None and dataclasses.is_dataclass(node):
        known = ", ".join(sorted(f.name for f in dataclasses.fields(node)))
        where = f"stage {stage}'s model section" if node is MODEL_SECTIONS[stage] else node.__name__
        return ConfigError(f"unknown config key '{key}' ({where} has: {known}).")
    expected = _expected(err) if isinstance(err, ValidationError) and key else None
    if expected:
        return ConfigError(f"{key} must be {expected}, got {err.value!r}.")
    return ConfigError(f"config: {_first_line(err)}.")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config, apply the presets and the overrides, validate the result."""
    config_dir = CONFIG_DIR
    run = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        run = _read_yaml(path)
        config_dir = path.resolve().parent
    user = OmegaConf.merge(run, parse_overrides(list(overrides)))
    stage = _stage(user)
    schema = OmegaConf.structured(Config(stage=stage, model=MODEL_SECTIONS[stage]()))
    try:
        merged = OmegaConf.merge(schema, _model_presets(user, stage, config_dir), user)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _schema_error(err, stage) from None
    validate(config)
    return config


def dump(config: Config) -> str:
    """The config as YAML, every key written (a file ``load_config`` reads back to ``config``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
