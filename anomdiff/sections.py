"""Typed configuration sections: dataclasses built from nested dicts (YAML), strictly.

A key the dataclass does not have fails with its dotted path and the nearest valid spelling; a
value of the wrong type fails with its dotted path. ``anomdiff.config`` (experiments) and
``anomdiff.models.config`` (models) are trees of these sections.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any


class UnknownKeyError(ValueError):
    """A config key that does not exist; the message names it and suggests the nearest valid one."""

    def __init__(self, key: str, valid: list[str]):
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
        hint = f"; did you mean {key[: len(key) - len(leaf)]}{close[0]}?" if close else ""
        super().__init__(f"unknown config key {key}{hint} (valid here: {', '.join(valid)})")
        self.key, self.suggestion, self.valid = key, close[0] if close else None, list(valid)

    def __reduce__(self):  # rebuilt from its arguments: a Ray worker's error reaches the driver whole
        return UnknownKeyError, (self.key, self.valid)


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type; the message names its dotted key."""


def require_at_least(section: str, obj: object, names: tuple[str, ...], low: int = 1) -> None:
    """Raise ``ValueError`` naming ``section.name`` for each integer field of ``obj`` below ``low``."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{section}.{name} must be an integer >= {low}, got {value!r}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Section:
    #: the dotted path errors use when the section is built on its own (not inside a parent)
    config_path: typing.ClassVar[str] = ""
    """``from_dict`` / ``to_dict`` shared by every config dataclass."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Any = None, *, _path: str | None = None):
        """Build from a (possibly partial) dict, on top of ``base`` (default: the dataclass defaults).

        Raises ``ValueError`` naming the dotted path of any unknown key and ``TypeError`` naming the
        key whose value has the wrong type.
        """
        _path = cls.config_path if _path is None else _path
        if not isinstance(data, dict):
            raise ConfigTypeError(f"{_path}: expected a mapping, got {type(data).__name__}")
        base = base if base is not None else cls()
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise UnknownKeyError(_join(_path, unknown[0]), names)
        values = {}
        for name in names:
            current = getattr(base, name)
            if name not in data:
                values[name] = copy.deepcopy(current)  # a derived config never shares state with its base
                continue
            key = _join(_path, name)
            hint = hints[name]
            if isinstance(hint, type) and issubclass(hint, Section):
                values[name] = hint.from_dict(data[name] or {}, base=current, _path=key)
            else:
                values[name] = _coerce(data[name], hint, key)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict (nested dicts, lists, scalars)."""
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple annotation (scalars, ``X | None``, ``list[X]``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        errors = []
        for option in inner:
            try:
                return _coerce(value, option, key)
            except TypeError as exc:
                errors.append(str(exc))
        raise ConfigTypeError(errors[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigTypeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads "1e-6" as a string (YAML 1.1 wants "1.0e-6"); accept numeric strings.
        if isinstance(value, bool):
            raise ConfigTypeError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigTypeError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigTypeError(f"{key}: unsupported annotation {hint!r}")
