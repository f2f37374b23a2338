"""Typed dataclasses from plain YAML data: `build_dataclass` checks every key and value against
the dataclass fields' annotations (Literal choices, unions, lists, nested sections) and raises one
`ConfigError` naming the dotted key, what was expected and, for a misspelling, the closest name."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

# YAML 1.1 reads 1e-4 as a string; such text is accepted where a float is expected.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key and how to fix it."""


def _suggest(key: str, options) -> str:
    match = difflib.get_close_matches(str(key), list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true | false"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str):
    """`value` checked against type `tp`; raises ConfigError naming `key` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: `mixed_precision: no`
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in args if isinstance(a, str) and a in words), value)
        if value in args and type(value) in {type(a) for a in args}:
            return value
        hint = _suggest(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-4` (no dot) as a string; accept exactly such numeric spellings.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r} (quote it in YAML)")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is list:
            return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp in (Path, os.PathLike):
        if isinstance(value, str):
            return Path(value)
        raise ConfigError(f"{key}: expected a path string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls, raw: dict, prefix: str = ""):
    """An instance of dataclass `cls` from the mapping `raw`, with type checks on every field.

    Unknown keys raise ConfigError with the closest valid key; errors raised by the dataclass's
    own validation (`__post_init__`) are re-raised as ConfigError prefixed with the section path.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key{_suggest(key, fields)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(_join(prefix, str(exc))) from exc


def _join(prefix: str, message: str) -> str:
    """`data` + `subsets[1].repeats: ...` -> `data.subsets[1].repeats: ...` (else `data: ...`)."""
    if not prefix:
        return message
    if re.match(r"^[A-Za-z_][\w\[\].]*:", message):
        return f"{prefix}.{message}"
    return f"{prefix}: {message}"


