"""Machinery that turns plain YAML/JSON data into frozen, typed config dataclasses.

Each dataclass field declares its type in the annotation and, where it has one, its allowed range in the
field metadata (``ge``, ``gt``, ``le``, ``lt``, ``min_len``). Every failure is a :class:`ConfigError`
whose message names the dotted field path, the bad value and what is allowed, e.g.::

    search.num_samples: must be >= 1, got 0
    space: unknown key 'learnin_rate'; allowed: augmentation, backbones, ... (did you mean 'learning_rate'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from automl_tl.errors import ConfigError

T = TypeVar("T")

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def build_dataclass(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = str(unknown[0])
        hint = difflib.get_close_matches(key, list(fields), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"{where or 'config'}: unknown key '{key}'; allowed: {', '.join(sorted(fields))}{suggestion}"
        )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        path = f"{where}.{name}" if where else str(name)
        coerced = coerce(hints[name], value, path)
        check_range(fields[name].metadata, coerced, path)
        values[name] = coerced
    missing = [
        n
        for n, f in fields.items()
        if n not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required field '{missing[0]}'")
    return cls(**values)


def coerce(hint: Any, value: Any, path: str) -> Any:
    """Return ``value`` as type ``hint`` or raise a ConfigError naming ``path``."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{path}: {'; or '.join(errors)}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {_show(value)}")
        return value
    if origin is tuple:
        args = get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                value = [value]  # a single value stands for a one-element list
            else:
                raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        from_config = getattr(hint, "from_config", None)
        if from_config is not None:
            return from_config(value, path)
        return build_dataclass(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_show(value)}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"config machinery cannot handle the annotation {hint!r} of {path}")


def check_range(meta: Mapping[str, Any], value: Any, path: str) -> None:
    """Apply the ``ge/gt/le/lt/min_len`` bounds in a field's metadata."""
    if value is None or not meta:
        return
    items = value if isinstance(value, tuple) else (value,)
    if "min_len" in meta and isinstance(value, tuple) and len(value) < meta["min_len"]:
        raise ConfigError(f"{path}: needs at least {meta['min_len']} value(s), got {_show(list(value))}")
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        for key, ok, word in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            if key in meta and not ok(item, meta[key]):
                raise ConfigError(f"{path}: must be {word} {meta[key]}, got {_show(item)}")


def bounded(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A dataclass field with range bounds, e.g. ``bounded(1, ge=1)``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default for a config field")
    return dataclasses.field(default=default, metadata=bounds)


def to_plain(obj: Any) -> Any:
    """A config dataclass as plain dicts, lists and scalars (for YAML/JSON and Ray's dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
