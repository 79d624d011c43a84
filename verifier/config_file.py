"""Nested frozen configuration dataclasses to and from TOML (``verify --config FILE.toml``,
``verify --print-config``).

A table per nested dataclass, named as its field (``[attack]``, ``[alpha]``, ``[bab]``), the
top-level fields first; a key the dataclass does not have is an error naming the key and its
section. Fields that hold ``None`` (meaning "automatic") are written as a comment, since TOML has
no null: reading the file back leaves them at their default, ``None``. Only the types the
configurations use are handled: bool, int, float, str, and Optional of those.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from typing import Any, Mapping

from .errors import InputFileError, UsageError


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _scalar_kind(kind):
    """The non-None type of ``Optional[X]`` (X itself otherwise), and whether None is allowed."""
    args = typing.get_args(kind)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return kind, False


def _coerce(value, kind, where: str):
    base, optional = _scalar_kind(kind)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (bool, int, float, str) and type(value) is base:
        return value
    raise UsageError(f"{where}: expected {'an optional ' if optional else ''}{base.__name__}, "
                     f"got {type(value).__name__} {value!r}")


def from_mapping(cls, data: Mapping[str, Any], base=None, section: str = ""):
    """An instance of dataclass ``cls``: ``base`` (or the defaults) with the fields in ``data``
    replaced, nested tables recursively. Unknown keys and wrongly typed values raise
    ``UsageError`` naming the key and its section."""
    base = base if base is not None else cls()
    kinds = _field_types(cls)
    changes = {}
    for key, value in data.items():
        where = f"[{section}] {key}" if section else key
        if key not in kinds:
            place = f"section [{section}]" if section else "the top level"
            close = difflib.get_close_matches(key, kinds, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(sorted(kinds))
            raise UsageError(f"unknown configuration key {key!r} in {place} ({hint})")
        kind = kinds[key]
        if _is_config(kind):
            if not isinstance(value, Mapping):
                raise UsageError(f"{where}: expected a table [{key}], got {type(value).__name__}")
            changes[key] = from_mapping(kind, value, getattr(base, key), f"{section}.{key}" if section else key)
        else:
            if isinstance(value, Mapping):
                raise UsageError(f"{where}: expected a value, got a table")
            changes[key] = _coerce(value, kind, where)
    return dataclasses.replace(base, **changes)


def read_config(cls, path: str, base=None):
    """``from_mapping`` of the TOML file at ``path``; a missing or malformed file raises
    ``InputFileError`` naming it."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InputFileError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_mapping(cls, data, base)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)      # shortest round-tripping form, always with '.' or 'e'
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(config, header: str = "") -> str:
    """``config`` (a dataclass instance) as TOML that ``read_config`` turns back into an equal
    instance: scalars first, then one table per nested dataclass (dotted for deeper nesting)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _write_table(config, "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(config, name: str, lines: list[str]) -> None:
    kinds = _field_types(type(config))
    nested = []
    if name:
        lines += ["", f"[{name}]"]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _is_config(kinds[f.name]):
            nested.append((f.name, value))
        elif value is None:
            lines.append(f"# {f.name} = (unset: automatic)")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for key, value in nested:
        _write_table(value, f"{name}.{key}" if name else key, lines)


def set_path(config, path: str, value):
    """``config`` with the field at dotted ``path`` (e.g. ``bab.branching``) replaced."""
    head, _, rest = path.partition(".")
    if rest:
        return dataclasses.replace(config, **{head: set_path(getattr(config, head), rest, value)})
    return dataclasses.replace(config, **{head: value})
