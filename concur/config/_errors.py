"""Error text: a pydantic ``ValidationError`` worded as concur's one-line problems.

Every problem reads ``KEY = VALUE (from SOURCE): WHAT IS WRONG``, or, for a check
across fields, ``KEY: WHAT IS WRONG [each field from its source]``: the same for the
config file, the environment, ``--set`` and flags, and for any payload validated
against a model, such as ``PUT /concur/policy`` (:func:`explain`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from concur.config._tree import Loc, dotted, model_at

MASK = "***"
"""What is shown instead of a secret."""

MAX_SHOWN = 200
"""Longest value quoted back in a problem, in characters; longer ones are cut (and a
validator's message, which may quote the value, at twice this)."""


class ConfigError(ValueError):
    """A configuration that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Layer:
    """Where one source's values came from: a label per key it set."""

    origins: Mapping[Loc, str]
    as_typed: bool = False
    """Its values are text as the user typed it (environment, ``--set``): shown unquoted."""

    def origin(self, loc: Loc) -> str | None:
        """The label of the longest key in this layer that is ``loc`` or a prefix of it."""
        for n in range(len(loc), 0, -1):
            label = self.origins.get(loc[:n])
            if label is not None:
                return label
        return None

    def under(self, loc: Loc) -> Iterator[tuple[Loc, str]]:
        """Keys of this layer inside the table at ``loc``, or holding it."""
        for key, label in self.origins.items():
            if key[: len(loc)] == loc or loc[: len(key)] == key:
                yield key, label


def explain(
    exc: ValidationError, model: type[BaseModel], layers: Sequence[Layer] = ()
) -> list[str]:
    """One line per error of ``exc``, raised validating ``model``.

    ``layers`` (highest precedence first) say where each value came from; without them
    a line names the key, the value and what is wrong.
    """
    problems = []
    for err in exc.errors():
        # Drop the tags pydantic adds for unions and validators ("function-after[...]").
        loc: Loc = tuple(p for p in err["loc"] if isinstance(p, int) or "[" not in p)
        path = dotted(loc) or "(top level)"
        reason = _reason(err, loc, model)
        value = err.get("input")
        if isinstance(value, Mapping) and err["type"] != "extra_forbidden":
            problems.append(f"{path}: {reason}{_sources_of(loc, layers)}")
            continue
        origin, as_typed = _origin(loc, layers)
        where = f" (from {origin})" if origin else ""
        problems.append(f"{path} = {_show(value, as_typed)}{where}: {reason}")
    return problems


def bare(msg: str) -> str:
    """A pydantic message without the prefix it puts before a validator's own text."""
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _origin(loc: Loc, layers: Sequence[Layer]) -> tuple[str | None, bool]:
    for layer in layers:
        label = layer.origin(loc)
        if label is not None:
            return label, layer.as_typed
    # E.g. an unknown table: name the key that brought it in.
    for layer in layers:
        for _key, label in layer.under(loc):
            return label, layer.as_typed
    return None, False


def _sources_of(loc: Loc, layers: Sequence[Layer]) -> str:
    """For a check across fields: where each field involved came from."""
    if not layers:
        return ""
    sources: dict[str, str] = {}
    for layer in layers:
        for key, label in layer.under(loc):
            sources.setdefault(dotted(key), label)
    if not sources:
        return " [defaults]"
    return " [" + "; ".join(f"{key} from {label}" for key, label in sources.items()) + "]"


def _show(value: Any, as_typed: bool) -> str:
    if as_typed and isinstance(value, str):
        text = value
    elif isinstance(value, SecretStr):
        text = MASK
    elif isinstance(value, str | int | float | bool | list | tuple | dict) or value is None:
        text = json.dumps(value, default=str)
    else:
        text = repr(value)
    return _cut(text, MAX_SHOWN)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(err: Mapping[str, Any], loc: Loc, model: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    bounds = {
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}"
    if kind == "extra_forbidden":
        parent = model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "none"
        return f"unknown setting; allowed here: {allowed}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    for kinds, text in _REASONS:
        if kind in kinds:
            return text
    return _cut(bare(str(err["msg"])), 2 * MAX_SHOWN)


_REASONS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"int_parsing", "int_type", "int_from_float"}), "must be a whole number"),
    (frozenset({"float_parsing", "float_type", "finite_number"}), "must be a number"),
    (frozenset({"bool_parsing", "bool_type"}), "must be true or false"),
    (frozenset({"string_type", "string_sub_type"}), "must be a string"),
    (frozenset({"string_too_short"}), "must not be empty"),
    (frozenset({"list_type", "tuple_type"}), "must be a list"),
    (
        frozenset({"model_type", "dict_type", "model_attributes_type"}),
        "must be a table of settings (a mapping), not a single value",
    ),
)
