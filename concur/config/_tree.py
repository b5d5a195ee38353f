"""Walking a tree of pydantic models: its sections, its leaf fields, dotted names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

Loc = tuple[str | int, ...]
"""Where a value sits in the tree: ``("policy", "aimd", "high")``, list items by index."""


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, if it is a table of settings rather than a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model of the table at ``loc`` under ``model`` (None: not a table)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or not isinstance(part, str):
            return None
        field = current.model_fields.get(part)
        current = submodel(field.annotation) if field else None
    return current


def dotted(loc: Loc) -> str:
    """``("admission", "identity", 0)`` -> ``"admission.identity[0]"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def iter_fields(
    model: type[BaseModel], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every leaf field under ``model``, as (dotted path parts, field info)."""
    for name, field in model.model_fields.items():
        sub = submodel(field.annotation)
        if sub is not None:
            yield from iter_fields(sub, (*path, name))
        else:
            yield (*path, name), field
