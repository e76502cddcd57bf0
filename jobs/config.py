"""Job configuration: nested dataclasses, loaded from YAML, overridden with ``--set key.path=value``.

One dataclass tree per job. The key path of an option is the same string everywhere: in YAML, in
``--set``, and as the MLflow param name (``gan.gp_weight``). Unknown keys are rejected with the list of
valid ones; validation lives in each dataclass's ``__post_init__`` and names the option it rejects.

Secrets never live here: S3 keys come from the standard AWS environment / config files only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be loaded: unknown key, wrong type, or a value that fails validation."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML / CLI value to the declared field type, or raise ConfigError naming ``path``."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of options, got {value!r}")
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"in '{prefix}'" if prefix else "at the top level"
        raise ConfigError(
            f"unknown option(s) {', '.join(repr(k) for k in unknown)} {where}; "
            f"valid options: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, tp in types_.items():
        if name in data:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"gan.gp_weight=10"`` -> (["gan", "gp_weight"], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (copied). Unknown paths are rejected when ``cls`` is given."""
    data = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        node_cls = cls
        for i, k in enumerate(keys[:-1]):
            if node_cls is not None:
                valid = _field_types(node_cls)
                if k not in valid:
                    prefix = ".".join(keys[:i]) or "the top level"
                    raise ConfigError(
                        f"--set {text}: unknown option {k!r} in {prefix}; valid options: {', '.join(sorted(valid))}"
                    )
                node_cls, _ = _strip_optional(valid[k])
                if not dataclasses.is_dataclass(node_cls):
                    raise ConfigError(f"--set {text}: {'.'.join(keys[: i + 1])} is not a group of options")
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {'.'.join(keys[: i + 1])} is not a group of options")
        if node_cls is not None:
            valid = _field_types(node_cls)
            if keys[-1] not in valid:
                prefix = ".".join(keys[:-1]) or "the top level"
                raise ConfigError(
                    f"--set {text}: unknown option {keys[-1]!r} in {prefix}; valid options: {', '.join(sorted(valid))}"
                )
        node[keys[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a config dataclass tree from a plain mapping, validating every key and value."""
    return _build(cls, dict(data or {}))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None), then apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of options")
        data = loaded
    data = apply_overrides(data, list(overrides or []), cls)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as a plain nested mapping (YAML- and JSON-serialisable)."""
    out = dataclasses.asdict(cfg)
    return _lists(out)


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"gan.gp_weight": 10.0, ...}``: the key paths used by ``--set`` and as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = node

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return flat


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
