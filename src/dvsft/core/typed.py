"""Values checked against a dataclass field's type: the one check of config keys, model options and presets.

A value fits a type as YAML or Python writes it: an int widens to float, a single value is a one-item
list, a list is a tuple where the field is one, a path is a string; nothing is parsed from text.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


def fit(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether ``value`` is a ``tp``, the value as one)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, out = fit(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (list, tuple):
        items = [fit(v, args[0] if args else Any) for v in (value if isinstance(value, list | tuple) else [value])]
        return all(ok for ok, _ in items), origin(v for _, v in items)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type) and issubclass(tp, Enum):
        return isinstance(value, tp) or any(value == m.value for m in tp), value
    if tp is float and type(value) is int:
        return True, float(value)
    if tp is str and isinstance(value, os.PathLike):
        return True, os.fspath(value)
    if tp is type(None):
        return value is None, value
    return isinstance(value, tp) and (tp is bool or not isinstance(value, bool)), value


def type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``one of auto, all``, ``list[str]``: a type as an error message names it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if tp is type(None):
        return "null"
    return str(tp) if origin else getattr(tp, "__name__", str(tp))


def typed(cls: type[T], values: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> T:
    """``cls(**values)`` with every value checked against its field's type (nested dataclasses from mappings).

    ``skip``: fields that may not be set here. Raises ``ValueError`` naming ``where``, the key and, for an
    unknown key, the valid ones.
    """
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.name not in skip]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    kwargs = {}
    for key, value in values.items():
        kind = hints[key]
        if is_dataclass(kind) and isinstance(value, dict):
            kwargs[key] = typed(kind, value, f"{where}.{key}")
            continue
        ok, kwargs[key] = fit(value, kind)
        if not ok:
            raise ValueError(f"{where}.{key}: expected {type_name(kind)}, got {value!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # the dataclass's own checks
        raise ValueError(f"{where}: {err}") from err
