"""Typed configs: a YAML file, then environment overrides, validated by pydantic on load.

Environment overrides use the prefix given by the caller and `__` between nested keys, values
parsed as YAML scalars: `RISE_SERVER__PORT=50061`, `RISE_SERVER__AUTH_TOKENS='[a, b]'`.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ConfigError(ValueError):
    pass


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = data.get(key)
        if not isinstance(node, dict):
            node = data[key] = {}
        data = node
    data[path[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    env_prefix: str = "RISE_",
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Load `cls` from an optional YAML file, then env overrides, then dotted-key overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    environ = os.environ if environ is None else environ
    for name, raw in sorted(environ.items()):
        if name.startswith(env_prefix) and len(name) > len(env_prefix):
            keys = [k.lower() for k in name[len(env_prefix):].split("__")]
            if keys[0] in cls.model_fields:
                _set_path(data, keys, yaml.safe_load(raw))
    for dotted, raw in (overrides or {}).items():
        _set_path(data, dotted.split("."), yaml.safe_load(raw) if isinstance(raw, str) else raw)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        source = f" ({path})" if path else ""
        raise ConfigError(f"invalid {cls.__name__} config{source}:\n{exc}") from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` items (dotted keys) -> {key: value}; a malformed item raises ValueError."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. learner.steps=100")
        overrides[key.strip()] = value
    return overrides


def dump_config(config: BaseModel) -> str:
    """The config as YAML, as printed at start and saved beside results."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
