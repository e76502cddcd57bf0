"""One options system for every ``deepfill`` subcommand: a dataclass tree per job, YAML in, flags and
``--set key.path=value`` overrides generated from it.

A job declares its options once, as nested dataclasses. The comment after a field is its help text; the
dataclass's ``__post_init__`` validates and names the option it rejects. From that one declaration:

- ``--config FILE`` loads YAML (a file may start from another with ``base: other.yaml``, relative to
  itself; mappings merge key by key, the file's own values win);
- ``--<name>`` flags are generated for the top-level options (``batch_size`` -> ``--batch-size``; booleans
  get ``--flag`` / ``--no-flag``); nested ones are set with ``--set``;
- ``--set key.path=value`` (repeatable, the value parsed as YAML) sets any option;
- ``--print-config`` prints the resolved tree and exits.

Precedence: defaults < ``--config`` < flags < ``--set``. The key path of an option is the same string
everywhere: YAML, ``--set``, the flag (with ``-`` for ``_``) and the MLflow param name (``gan.gp_weight``).
An unknown key lists the valid ones; a bad value names the option; a YAML or ``--set`` parse error is one
line. Secrets are never options: S3 keys come from the AWS environment only.

Every ``float`` option of every job must be finite: ``.inf``, ``nan`` (YAML or ``--set``) are refused with
the option named, before any ``__post_init__`` sees them (``nan`` passes every ``<``/``>`` comparison). A
field that genuinely accepts infinity says so with ``field(metadata={NON_FINITE_OK: True})``; none does today.
``check_name`` is the shared rule for options that become folder, run or model names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import math
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """Options that cannot be loaded: unknown key, wrong type, a value failing validation, bad YAML."""


NON_FINITE_OK = "non_finite_ok"  # field metadata key: this float option accepts inf / nan


def check_name(value: str, option: str, *, allow_empty: bool = False, forbid: str = "/\\") -> None:
    """Refuse a name that cannot safely become a folder, run or registry name, naming ``option``: empty
    (unless ``allow_empty``), ``.`` or ``..`` (as the whole name or a ``/`` segment), leading or trailing
    whitespace, control characters, or any character of ``forbid``. Raises ValueError."""
    if value == "":
        if allow_empty:
            return
        raise ValueError(f"{option} must not be empty")
    bad = sorted({c for c in value if c in forbid})
    if bad:
        raise ValueError(f"{option} must not contain {' or '.join(repr(c) for c in bad)}, got {value!r}")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError(f"{option} must not contain control characters, got {value!r}")
    if value != value.strip():
        raise ValueError(f"{option} must not start or end with whitespace, got {value!r}")
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError(f"{option} must not be or contain a '.' or '..' path segment, got {value!r}")


# ----------------------------------------------------------------------------------------- declaration

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from ``cls``'s source: the comment after a field on its line (continued by comment
    lines aligned under it, ``#    more``), or else the comment lines right above the field. Fields a
    dataclass inherits take the help written where they are declared."""
    inherited: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            inherited.update(field_help(base))
    try:
        lines, _ = inspect.getsourcelines(cls)
        tokens = list(tokenize.generate_tokens(io.StringIO("".join(lines)).readline))
    except (OSError, TypeError, tokenize.TokenError, IndentationError):
        return inherited
    comments = {t.start[0] - 1: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    alone = {i for i in comments if lines[i].lstrip().startswith("#")}  # comment-only lines
    names = {f.name for f in dataclasses.fields(cls)}
    helps = {}
    for i, line in enumerate(lines):
        match = re.match(r"^\s+(\w+)\s*:", line)
        if not match or match.group(1) not in names:
            continue
        if i in comments:
            parts, j = [comments[i]], i + 1
            while j in alone and re.match(r"^\s*#\s{2,}", lines[j]):
                parts.append(comments[j])
                j += 1
        else:
            parts, j = [], i - 1
            while j in alone:
                parts.insert(0, comments[j])
                j -= 1
        if any(parts):
            helps[match.group(1)] = " ".join(p for p in parts if p)
    return {**inherited, **helps}


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (``MISSING`` for a required field)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every leaf option under ``cls``: (key path, type name, default, help), in declaration order."""
    out = []
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(_field_types(cls)[f.name])
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(describe(tp, path + "."))
            continue
        out.append((path, _type_name(_field_types(cls)[f.name]), _default(f), helps.get(f.name, "")))
    return out


def _union_arms(tp: Any) -> tuple | None:
    """The arms of a union type other than ``None`` (``int | list[int]``), or None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return None


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    origin = typing.get_origin(inner)
    if _union_arms(inner):
        name = " or ".join(_type_name(a) for a in _union_arms(inner))
    elif origin is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(inner))
    elif origin in (list, tuple):
        name = "list"
    elif origin is dict:
        name = "mapping"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


# ----------------------------------------------------------------------------------------- values

def _coerce(value: Any, tp: Any, path: str, finite: bool = True) -> Any:
    """Convert a YAML / CLI value to the declared field type, or raise ConfigError naming ``path``.
    ``finite``: a float (also inside a list or mapping) must not be inf or nan."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must not be null")
    arms = _union_arms(tp)
    if arms:  # ``int | list[int]``: a list value takes the list arm, anything else the first arm that fits
        ordered = sorted(arms, key=lambda a: typing.get_origin(a) not in (list, tuple)) \
            if isinstance(value, (list, tuple)) else arms
        errors = []
        for arm in ordered:
            try:
                return _coerce(value, arm, path, finite)
            except ConfigError as err:
                errors.append(str(err).removeprefix(f"{path}: "))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of options, got {value!r}")
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _yaml_value(value, path) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, path)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, value_tp = (typing.get_args(tp) or (Any, Any))
        return {_coerce(k, key_tp, path, finite): _coerce(v, value_tp, f"{path}.{k}", finite)
                for k, v in value.items()}
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
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if finite and not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
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
        raise ConfigError(f"unknown option(s) {', '.join(repr(k) for k in unknown)} {where}; "
                          f"valid options: {', '.join(sorted(types_))}")
    finite = {f.name: not f.metadata.get(NON_FINITE_OK, False) for f in dataclasses.fields(cls)}
    kwargs = {name: _coerce(data[name], tp, f"{prefix}.{name}" if prefix else name, finite[name])
              for name, tp in types_.items() if name in data}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _default(f) is MISSING]
    if missing:
        paths = [f"{prefix}.{m}" if prefix else m for m in missing]
        raise ConfigError("missing option(s): " + ", ".join(
            f"{p} (--{p.replace('_', '-')})" if "." not in p else p for p in paths))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{err}") from None


def _yaml_value(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line out of PyYAML's multi-line message: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}"


# ----------------------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"gan.gp_weight=10"`` -> (["gan", "gp_weight"], 10); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    value = _yaml_value(raw, f"--set {text}") if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw mapping (copied). Unknown paths are rejected when ``cls`` is given."""
    data = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, keys, value, cls, f"--set {text}: ")
    return data


def set_path(data: dict, keys: list[str], value: Any, cls: type | None = None, context: str = "") -> None:
    """``data[keys[0]][keys[1]]... = value`` in place, each key checked against ``cls``'s tree when given."""
    node, node_cls = data, cls
    for i, k in enumerate(keys):
        if node_cls is not None:
            valid = _field_types(node_cls)
            if k not in valid:
                prefix = ".".join(keys[:i]) or "the top level"
                raise ConfigError(f"{context}unknown option {k!r} in {prefix}; "
                                  f"valid options: {', '.join(sorted(valid))}")
            node_cls, _ = _strip_optional(valid[k])
        if i == len(keys) - 1:
            node[k] = value
            return
        child = node.setdefault(k, {})
        if not isinstance(child, dict) or (node_cls is not None and not dataclasses.is_dataclass(node_cls)):
            raise ConfigError(f"{context}{'.'.join(keys[: i + 1])} is not a group of options")
        node = child


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mapping by mapping (a copy)."""
    out = _deep_copy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _deep_copy(v)
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping, with its ``base:`` chain resolved (relative to each file)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        raise ConfigError(f"{path}: 'base' loops back to {path.name}")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of options")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must name another config file, got {base!r}")
    return _merge(read_yaml(path.parent / base, (*_chain, resolved)), loaded)


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a dataclass tree from a plain mapping, validating every key and value."""
    return _build(cls, dict(data or {}))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> T:
    """``cls`` from defaults, then the YAML file (with its ``base:`` chain), then ``values`` (key path ->
    value, e.g. from flags), then ``--set`` overrides."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for key, value in (values or {}).items():
        set_path(data, key.split("."), value, cls)
    return from_dict(cls, apply_overrides(data, list(overrides or []), cls))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved options as a plain nested mapping (YAML- and JSON-serialisable)."""
    return _lists(dataclasses.asdict(cfg))


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
        if isinstance(node, dict) and (node or not prefix):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = node

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return flat


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------- the CLI

_METAVARS = {int: "N", float: "X", list: "A,B,..."}  # str flags show the option name


def _flag_type(tp: Any) -> Any | None:
    """What a top-level field's flag takes: a scalar type, a Literal, ``list``; None: set it with --set."""
    inner, _ = _strip_optional(tp)
    if typing.get_origin(inner) is typing.Literal or inner in (str, int, float, bool):
        return inner
    return list if typing.get_origin(inner) in (list, tuple) else None


def add_options(parser: argparse.ArgumentParser, cls: type, *, config_help: str | None = None) -> None:
    """Give ``parser`` the options of ``cls``: ``--config``, a flag per top-level option, ``--set`` and
    ``--print-config``; the options only ``--set`` reaches are listed, with their help, in the epilog.

    Flags keep their raw text (``from_args`` converts and validates it like YAML values) and are absent
    from the namespace unless given, so a flag overrides the config file only when it is used."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", "-c", default=None, metavar="FILE",
                        help=config_help or "YAML file of options (may name a 'base:' file it builds on)")
    helps, types_, nested = field_help(cls), _field_types(cls), []
    for f in dataclasses.fields(cls):
        kind = _flag_type(types_[f.name])
        if kind is None:
            nested.append(f.name)
            continue
        flag, default = "--" + f.name.replace("_", "-"), _default(f)
        text = helps.get(f.name, "").replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{text} (default: {'on' if default else 'off'})")
            continue
        if default is MISSING:
            text += " (required)"
        elif default is not None:
            text += f" (default: {default})"
        if kind is list:  # repeatable: --model A --model B is --model A,B
            parser.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS,
                                help=f"{text} (repeatable)", metavar=_METAVARS[list])
            continue
        literal = typing.get_origin(kind) is typing.Literal
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text,
                            choices=list(typing.get_args(kind)) if literal else None,
                            metavar=None if literal else _METAVARS.get(kind, f.name.upper()))
    parser.add_argument("--set", dest="_overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="set any option by its key path (repeatable; the value is YAML)")
    parser.add_argument("--print-config", dest="_print_config", action="store_true",
                        help="print the resolved options as YAML and exit")
    if nested:
        lines = ["options set with --set KEY.PATH=VALUE (or in the --config file):"]
        for path, type_name, default, text in describe(cls):
            if path.split(".", 1)[0] in nested:
                lines.append(f"  {path} ({type_name}{'' if default is MISSING else f' = {default!r}'})")
                lines.extend([f"      {text}"] if text else [])
        parser.epilog = "\n".join(lines)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The options of ``cls`` from a namespace parsed by a parser that ``add_options`` set up."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name, value in values.items():
        if isinstance(value, list):  # a repeatable list flag: its occurrences, each read as one flag would be
            values[name] = [item for text in value for item in _coerce(text, list[Any], f"--{name.replace('_', '-')}")]
    return load_config(cls, args.config, args._overrides, values)
