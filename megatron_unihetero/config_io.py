"""Typed configs from YAML with dotted command-line overrides (OLMo-core style).

``load_config(RunConfig, "run.yaml", ["--train.lr=3e-4", "--model.llm.num_layers=4"])``
builds the nested dataclasses, checks every field's type, and names the offending key in every
error: an unknown key, a value of the wrong type, or a dataclass's own validation.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigLoadError(ValueError):
    pass


def from_dict(cls: Type[T], data: Optional[Dict[str, Any]], path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and wrong types are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigLoadError(
            f"unknown key(s) {', '.join(_join(path, k) for k in unknown)}; "
            f"{cls.__name__} has: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigLoadError(f"{path or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: Type[T], path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    data: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as handle:
                data = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigLoadError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigLoadError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigLoadError(f"config file {path!r} must hold a mapping at the top level")
    for item in overrides:
        apply_override(data, item)
    return from_dict(cls, data)


def save_config(obj: Any, path: str) -> None:
    with open(path, "w") as handle:
        yaml.safe_dump(to_dict(obj), handle, sort_keys=False)


def apply_override(data: Dict[str, Any], item: str) -> None:
    """Apply ``--a.b.c=value`` (value parsed as YAML: numbers, bools, lists, null)."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigLoadError(f"override {item!r} must look like --section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigLoadError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _convert(candidate, value, path)
            except ConfigLoadError as exc:
                errors.append(str(exc))
        raise ConfigLoadError(errors[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigLoadError(f"{path} must be a mapping (section), got {value!r}")
        return from_dict(hint, value, path)
    if origin in (list, List, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigLoadError(f"{path} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigLoadError(f"{path} must be a mapping, got {value!r}")
        inner = args[1] if args else Any
        return {k: _convert(inner, v, _join(path, str(k))) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "3e-4" as a string
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigLoadError(f"{path} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigLoadError(f"{path} must be an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigLoadError(f"{path} must be a string, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigLoadError(f"{path} must be {hint.__name__}, got {value!r}")
    return value
