"""The one exception tree of automl_tl.

Every error a user can cause (a bad config, an unreadable data set, a missing weight file, a tampered
artifact) is an :class:`AutoMLError`. The CLI prints these as a single line and exits with code 2; the
HTTP server turns them into 4xx answers. Anything else escaping is a bug in automl_tl.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "AutoMLError",
    "ConfigError",
    "DatasetError",
    "BackboneError",
    "ArtifactError",
    "SearchError",
    "config_error",
    "describe_validation_error",
    "shown",
]


class AutoMLError(Exception):
    """Base class of every error automl_tl raises on purpose."""


class ConfigError(AutoMLError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DatasetError(AutoMLError):
    """The data cannot be turned into a usable training set."""


class BackboneError(AutoMLError):
    """A backbone is unknown, cannot be built, or its pretrained weights cannot be found."""


class ArtifactError(AutoMLError):
    """A saved artifact is missing, incomplete, tampered with or of an unknown format."""


class SearchError(AutoMLError):
    """The sweep cannot start or cannot continue (for example, no trial finished)."""


# --- how a pydantic error reads ------------------------------------------------------------------------------


def config_error(exc: ValidationError, where: str = "", model: Any = None) -> ConfigError:
    """``exc`` as a :class:`ConfigError` (see :func:`describe_validation_error`)."""
    return ConfigError(describe_validation_error(exc, where, model))


def describe_validation_error(exc: ValidationError, where: str = "", model: Any = None) -> str:
    """Every mistake in ``exc``, one line each: the dotted field, what is wrong with which value, what is allowed.

    ``where`` (a file, ``serve``) starts the message; ``model`` is the validated type, whose field names an
    unknown key is matched against ("did you mean ...").
    """
    errors = exc.errors(include_url=False)
    locs = [tuple(e["loc"]) for e in errors]
    lines: list[str] = []
    for err, loc in zip(errors, locs):
        # A list whose items failed also reports itself as too short "after validation": say the items only.
        if err["type"] == "too_short" and any(len(o) > len(loc) and o[: len(loc)] == loc for o in locs):
            continue
        line = _describe(err, loc, model)
        if line not in lines:
            lines.append(line)
    head = f"{where}: " if where else ""
    if len(lines) == 1:
        return head + lines[0]
    return f"{head}{len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines)


_KINDS = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "must be a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "model_type": "expected a mapping of fields",
    "model_attributes_type": "expected a mapping of fields",
    "dataclass_type": "expected a mapping of fields",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _describe(err: Any, loc: tuple[int | str, ...], model: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, shown(err.get("input"))
    if kind in ("extra_forbidden", "missing"):
        key, path = str(loc[-1]), _path(loc[:-1])
        if kind == "missing":
            text = f"missing field '{key}'"
        else:
            names = _field_names(model, loc[:-1])
            text = f"unknown key '{key}'"
            if names:
                hint = difflib.get_close_matches(key, names, n=1)
                text += f"; allowed: {', '.join(sorted(names))}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        return f"{path}: {text}" if path else text
    if kind in _KINDS:
        text = f"{_KINDS[kind]}, got {value}"
    elif kind in _BOUNDS:
        bound = next(v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt"))
        text = f"must be {_BOUNDS[kind]} {bound}, got {value}"
    elif kind == "literal_error":
        allowed = str(ctx.get("expected", ""))
        head, _, last = allowed.rpartition(" or ")
        text = f"must be one of {head + ', ' + last if head else allowed}, got {value}"
    elif kind == "too_short":
        text = f"needs at least {ctx.get('min_length')} value(s), got {shown(list(err.get('input') or ()))}"
    elif kind == "too_long":
        text = f"takes at most {ctx.get('max_length')} value(s), got {value}"
    elif kind == "string_too_short":
        text = f"must not be empty, got {value}" if ctx.get("min_length") == 1 else f"too short, got {value}"
    elif kind in ("value_error", "assertion_error") and "error" in ctx:
        text = str(ctx["error"])
    else:
        text = f"{err['msg']}, got {value}"
    path = _path(loc)
    return f"{path}: {text}" if path else text


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _field_names(model: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model found at ``loc`` inside ``model`` (none when it cannot be told)."""
    node = model
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int):
            args = get_args(node)
            node = args[0] if get_origin(node) in (list, tuple) and args else None
        else:
            node = _fields(node).get(part)
    return list(_fields(_unwrap(node)))


def _unwrap(hint: Any) -> Any:
    while True:
        if get_origin(hint) is Annotated:
            hint = get_args(hint)[0]
        elif get_origin(hint) in (Union, types.UnionType):
            hint = next((a for a in get_args(hint) if a is not type(None)), None)
        else:
            return hint


def _fields(hint: Any) -> dict[str, Any]:
    from pydantic import BaseModel

    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return {name: f.annotation for name, f in hint.model_fields.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return typing.get_type_hints(hint, include_extras=True)
    return {}


def shown(value: Any) -> str:
    """``value``'s repr, cut to 80 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
