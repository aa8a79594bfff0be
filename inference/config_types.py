"""The typed schema of the inference config: each key checked against its dataclass annotation (used by
`inference/config.py`'s `InferConfig`, `LoraSpec` and `ParallelConfig`)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, to_json

# ---- the typed schema: each key checked against its dataclass annotation ----------------------------------------
# Strict JSON types, driven by the field annotations (so keys added later get the same checks): "17" is not an
# integer and "false" is not a boolean (a non-empty string would otherwise read as true); NaN/inf are refused;
# nested dataclasses (lora_configs entries) refuse keys they do not have. Integral floats (1000.0) count as ints.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint, config=_STRICT)


def _plain(value: Any) -> Any:
    """A value as JSON would carry it: any sequence or mapping (tuples, OmegaConf lists from a training config) as
    a list / dict, numpy and torch scalars as Python numbers, integral floats (1000.0) as ints."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, str | bytes | bool) or value is None:
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return value


def describe_type(hint: Any) -> str:
    """A reader's name for a field annotation: `list[LoraSpec] | None` -> 'a list of {path: a string, ...} or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"a list (of {describe_type(args[0])})" if args else "a list"
    if origin is dict or hint is dict:
        return "an object"
    if dataclasses.is_dataclass(hint):
        inner = typing.get_type_hints(hint)
        return "{" + ", ".join(f"{f.name}: {describe_type(inner[f.name])}" for f in dataclasses.fields(hint)) + "}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             Any: "any value"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_field_types(obj: Any) -> None:
    """Check (and normalise: dicts -> dataclasses, ints -> floats) every field of the dataclass `obj` in place.

    Raises ValueError naming the key (with its position inside lists/objects), the value and the expected type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            checked = _adapter(hints[f.name]).validate_json(to_json(_plain(value)))
        except PydanticSerializationError:
            raise ValueError(f"config key {f.name}: {value!r} is not a JSON value; expected "
                             f"{describe_type(hints[f.name])}") from None
        except ValidationError as e:
            raise ValueError(_type_message(f.name, value, hints[f.name], e.errors()[0])) from None
        setattr(obj, f.name, checked)


def _untagged(value: Any, loc: tuple) -> tuple:
    """A pydantic error location without the union-member tags ('float', 'list[float]') of a union annotation."""
    out = []
    for part in loc:
        if isinstance(part, str) and not isinstance(value, dict) and not hasattr(value, part):
            continue  # a union member's tag, not a key
        out.append(part)
        value = value[part] if isinstance(value, dict | list | tuple) else getattr(value, part)
    return tuple(out)


def _at(value: Any, loc: tuple) -> Any:
    """The part of the user's (un-normalised) value at a pydantic error location."""
    for part in loc:
        if isinstance(value, dict):
            value = value[part]
        elif isinstance(value, list | tuple):
            value = value[part]
        else:
            value = getattr(value, str(part))
    return value


def _type_message(name: str, value: Any, hint: Any, err: dict[str, Any]) -> str:
    err = {**err, "loc": _untagged(value, err["loc"]) if err["type"] != "missing" else err["loc"]}
    where = name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    expected = f"{name} must be {describe_type(hint)}"
    if err["type"] == "missing":
        return f"config key {where} is missing in {_at(value, err['loc'][:-1])!r}; {expected}"
    got = _at(value, err["loc"])
    msg = f"config key {where} = {got!r} ({type(got).__name__}): {err['msg'].lower()}; {expected}"
    if isinstance(got, str) and err["type"] == "bool_type":
        msg += " (write JSON true/false without quotes)"
    elif isinstance(got, str) and err["type"] in ("int_type", "float_type"):
        msg += " (write the number without quotes)"
    return msg
