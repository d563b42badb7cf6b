"""Model configs from YAML: a dataclass, a dict of its fields (optionally with a ``preset``
name), or None for the defaults. Shared by the vision and text configs."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_any(cls: type[C], value: Any, what: str) -> C:
    """Build ``cls`` from ``value``; unknown fields are an error naming them."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        value = dict(value)
        preset = value.pop("preset", None)
        unknown = set(value) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")
        return cls.preset(preset, **value) if preset else cls(**value)  # type: ignore[attr-defined]
    raise TypeError(f"{what} config must be {cls.__name__}, dict or None, not {type(value)}")
