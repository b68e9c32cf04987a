"""Strict typed validation of the config dataclasses, from their type hints.

Why dataclasses and not pydantic: the configs are already frozen dataclasses that the trainer, the
sweep hashing and checkpoints use as they are, and the rules needed are few (a whole number is not a
bool or 2.7, a float is finite, a text is not a list). Checking those from the hints keeps every value
checked once, the same way in every command, with no new dependency.

`coerce` turns what YAML reads as a matter of style into the field's type (`2e-4` arrives as a string,
`1e7` as a float) and nothing else; `check` then rejects every value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from finemoe.errors import ConfigError


def require(cond: bool, msg: str) -> None:
    """The one way a config check fails: a one-line ConfigError."""
    if not cond:
        raise ConfigError(msg)


def check_known_keys(cls, data: dict[str, Any], what: str) -> None:
    """Name the keys of `data` that are not fields of dataclass `cls`, and the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {unknown}; valid keys: {sorted(known)}")


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(cls, data: dict[str, Any]) -> dict[str, Any]:
    """YAML reads `2e-4` as a string and users write `1e7` for an int: convert those by the field's type."""
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k]) if k in hints else v for k, v in data.items()}


def _coerce(value: Any, hint: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    opts = _options(hint)
    if isinstance(value, str) and (float in opts or int in opts) and str not in opts:
        try:
            number = float(value)
        except ValueError:
            return value  # `check` names it
        return int(number) if int in opts and float not in opts and number.is_integer() else number
    if isinstance(value, float) and int in opts and float not in opts and value.is_integer():
        return int(value)
    for opt in opts:
        if typing.get_origin(opt) is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(opt)
            elems = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
            return tuple(_coerce(v, a) for v, a in zip(value, elems)) + tuple(value[len(elems) :])
    return value


def check(obj: Any, what: str) -> None:
    """Every field of dataclass instance `obj` has its hinted type; ints given for floats become floats."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        fixed = _checked(value, hints[f.name], f"{what}.{f.name}")
        if fixed is not value:
            object.__setattr__(obj, f.name, fixed)


def _checked(value: Any, hint: Any, name: str) -> Any:
    opts = _options(hint)
    if value is None:
        if type(None) in opts:
            return value
        raise ConfigError(f"{name} must be set, got null")
    for opt in opts:
        origin = typing.get_origin(opt)
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if dataclasses.is_dataclass(opt) and isinstance(value, opt):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(opt)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_checked(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(f"{name} must hold {len(args)} values, got {_show(value)}")
            return tuple(_checked(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(f"{name} must be {_describe(opts)}, got {_show(value)}")


def _describe(opts: tuple[Any, ...]) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a text", type(None): "null"}
    out = []
    for opt in opts:
        if typing.get_origin(opt) is tuple:
            out.append("a list of numbers")
        else:
            out.append(words.get(opt, getattr(opt, "__name__", str(opt))))
    return " or ".join(out)
