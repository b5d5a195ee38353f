"""Where settings come from: pydantic-settings sources, highest precedence first.

Keyword arguments to ``Settings(...)``, then command-line flags, then programmatic
overrides, then ``--set KEY=VALUE``, then ``CONCUR_SECTION__FIELD`` environment
variables, then the TOML or YAML file named by ``--config`` or ``$CONCUR_CONFIG``, then
the defaults. :func:`settings_sources` is what ``Settings.settings_customise_sources``
returns: the sources of the load under way (:func:`reading`), or else the process's
environment and ``$CONCUR_CONFIG``. Each source notes where its values came from (a
:class:`Layer`) and each problem it meets (:meth:`Inputs.problem`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
)

from concur.config._errors import ConfigError, Layer
from concur.config._files import FileSource
from concur.config._tree import Loc

ENV_PREFIX = "CONCUR_"
ENV_DELIMITER = "__"
CONFIG_ENV_VAR = "CONCUR_CONFIG"
"""Environment variable naming the config file when ``--config`` is not given."""


@dataclass
class Inputs:
    """What one load reads, and what its sources found on the way."""

    env: Mapping[str, str]
    config_file: Path | None = None
    flags: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    """Dotted key -> (value, the flag it came from)."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    sets: Sequence[str] = ()
    """``--set`` items, ``KEY=VALUE``, later ones winning."""
    collect: bool = False
    """True: note each problem and go on, to report them all; False: raise at the first."""
    problems: list[str] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    """Where values came from, highest precedence first (filled as the sources run)."""

    def problem(self, text: str) -> None:
        if not self.collect:
            raise ConfigError(text)
        self.problems.append(text)

    def sources(self, settings_cls: type[BaseSettings]) -> list[PydanticBaseSettingsSource]:
        overrides = {key: (value, "override") for key, value in self.overrides.items()}
        out = [
            DottedSource(settings_cls, self, self.flags),
            DottedSource(settings_cls, self, overrides),
            SetSource(settings_cls, self),
            EnvSource(settings_cls, self),
        ]
        if self.config_file is not None:
            out.append(FileSource(settings_cls, self, self.config_file, None))
        elif self.env.get(CONFIG_ENV_VAR):
            path = Path(self.env[CONFIG_ENV_VAR])
            out.append(FileSource(settings_cls, self, path, CONFIG_ENV_VAR))
        return out


_ACTIVE: ContextVar[Inputs | None] = ContextVar("concur_config_inputs", default=None)


@contextmanager
def reading(inputs: Inputs) -> Iterator[Inputs]:
    """Within this block, ``Settings()`` reads ``inputs`` instead of the process's."""
    token = _ACTIVE.set(inputs)
    try:
        yield inputs
    finally:
        _ACTIVE.reset(token)


def settings_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Every source of one load, keyword arguments first."""
    inputs = _ACTIVE.get() or Inputs(os.environ)
    return (init_settings, *inputs.sources(settings_cls))


def parse_set_value(text: str) -> Any:
    """A ``--set`` value: JSON lists, objects, null and quoted strings are decoded;
    anything else stays text (numbers and booleans are converted by the field's type,
    so ``server.admin_token=123`` stays the string ``"123"``)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if value is None or isinstance(value, list | dict | str):
        return value
    return text


class DottedSource(PydanticBaseSettingsSource):
    """Values by dotted key (``policy.aimd.high``), each with where it came from."""

    as_typed = False

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        inputs: Inputs,
        values: Mapping[str, tuple[Any, str]],
    ) -> None:
        super().__init__(settings_cls)
        self.inputs = inputs
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole tree at once

    def entries(self) -> Iterator[tuple[str, Any, str]]:
        for key, (value, origin) in self.values.items():
            yield key, value, origin

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        origins: dict[Loc, str] = {}
        for key, value, origin in self.entries():
            parts = [p.strip().lower() for p in key.replace(ENV_DELIMITER, ".").split(".")]
            if not all(parts):
                self.inputs.problem(
                    f"{key!r} (from {origin}): use dotted names like policy.aimd.high"
                )
                continue
            node: Any = value
            for part in reversed(parts):
                node = {part: node}
            data = deep_merge(data, node)
            origins[tuple(parts)] = origin
        self.inputs.layers.append(Layer(origins, self.as_typed))
        return data


class SetSource(DottedSource):
    """``--set KEY=VALUE`` items (:func:`parse_set_value`)."""

    as_typed = True

    def __init__(self, settings_cls: type[BaseSettings], inputs: Inputs) -> None:
        super().__init__(settings_cls, inputs, {})

    def entries(self) -> Iterator[tuple[str, Any, str]]:
        for item in self.inputs.sets:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                self.inputs.problem(
                    f"--set {item!r}: expected KEY=VALUE, e.g. --set upstream.url=http://vllm:8000"
                )
                continue
            yield key.strip(), parse_set_value(raw), f"--set {key.strip()}"


class EnvSource(EnvSettingsSource):
    """``CONCUR_SECTION__FIELD`` variables of ``inputs.env``; a list may be ``a,b``."""

    def __init__(self, settings_cls: type[BaseSettings], inputs: Inputs) -> None:
        self.inputs = inputs  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = {k if self.case_sensitive else k.lower(): v for k, v in self.inputs.env.items()}
        if self.env_ignore_empty:
            env = {k: v for k, v in env.items() if v != ""}
        return env

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        # Not JSON: hand the raw text to the field's validators ("kv,working_set", "a,b").
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value

    def __call__(self) -> dict[str, Any]:
        sections = tuple(self.settings_cls.model_fields)
        origins: dict[Loc, str] = {}
        for name in self.inputs.env:
            upper = name.upper()
            if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV_VAR:
                continue
            rest = upper[len(ENV_PREFIX) :]
            wrong = _env_name_problem(name, rest, sections)
            if wrong:
                self.inputs.problem(wrong)
            elif rest.split(ENV_DELIMITER)[0].lower() in sections:
                origins[tuple(rest.lower().split(ENV_DELIMITER))] = name
        try:
            data = super().__call__()
        except SettingsError as exc:
            self.inputs.problem(f"environment: {exc}")
            data = {}
        self.inputs.layers.append(Layer(origins, as_typed=True))
        return data


def _env_name_problem(name: str, rest: str, sections: Sequence[str]) -> str | None:
    """``CONCUR_UPSTREAM_URL`` (one underscore) or an unknown section: not silently ignored."""
    head = rest.split(ENV_DELIMITER)[0].lower()
    if ENV_DELIMITER in rest and head not in sections:
        return f"{name} (environment): unknown section {head!r}; allowed: {', '.join(sections)}"
    for section in sections:
        tag = section.upper()
        if rest.startswith(tag + "_") and not rest.startswith(tag + ENV_DELIMITER):
            fixed = f"{ENV_PREFIX}{tag}{ENV_DELIMITER}{rest[len(tag) + 1 :]}"
            return (
                f"{name} (environment): sections and fields are joined by a double "
                f"underscore: use {fixed}"
            )
    return None


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
