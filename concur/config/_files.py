"""The config file source: TOML (``.toml``) or YAML (``.yaml``, ``.yml``)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from concur.config._errors import Layer
from concur.config._tree import Loc, submodel

if TYPE_CHECKING:
    from concur.config._sources import Inputs


class FileSource(PydanticBaseSettingsSource):
    """The TOML (``.toml``) or YAML (``.yaml``, ``.yml``) config file."""

    def __init__(
        self, settings_cls: type[BaseSettings], inputs: Inputs, path: Path, given: str | None
    ) -> None:
        super().__init__(settings_cls)
        self.inputs = inputs
        self.path = path
        self.name = f"config file {path}" + (f" (from {given})" if given else "")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        source = self._open()
        data = source() if source is not None else {}
        label = str(self.path)
        self.inputs.layers.append(Layer({loc: label for loc in _leaves(data)}))
        return data

    def _open(self) -> PydanticBaseSettingsSource | None:
        suffix = self.path.suffix.lower()
        problem = None
        if suffix not in (".toml", ".yaml", ".yml"):
            problem = (
                f"unknown type {self.path.suffix or '(no suffix)'!r}; "
                "name it *.toml, *.yaml or *.yml"
            )
        elif not self.path.exists():
            problem = "not found"
        elif not self.path.is_file():
            problem = "not a regular file"
        else:
            source, problem = _read(self.settings_cls, self.path)
            if source is not None:
                return source
        self.inputs.problem(f"{self.name}: {problem}")
        return None


def _read(
    settings_cls: type[BaseSettings], path: Path
) -> tuple[PydanticBaseSettingsSource | None, str]:
    source: TomlConfigSettingsSource | YamlConfigSettingsSource
    try:
        if path.suffix.lower() == ".toml":
            source = TomlConfigSettingsSource(settings_cls, toml_file=path)
        else:
            source = YamlConfigSettingsSource(settings_cls, yaml_file=path)
    except tomllib.TOMLDecodeError as exc:
        return None, f"invalid TOML: {exc}"
    except yaml.YAMLError as exc:
        return None, f"invalid YAML: {' '.join(str(exc).split())}"
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc})"
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    except (TypeError, ValueError):  # a YAML list or scalar where the sections should be
        return None, _NOT_A_MAPPING
    if isinstance(source, YamlConfigSettingsSource):
        if not isinstance(source.yaml_data, dict):
            return None, _NOT_A_MAPPING
        _drop_empty_sections(source.init_kwargs, settings_cls)
    return source, ""


_NOT_A_MAPPING = "the top level must be a mapping of sections (upstream:, server:, ...)"


def _drop_empty_sections(data: dict[str, Any], model: type[BaseModel]) -> None:
    """YAML ``section:`` with every child commented out reads as null: treat it as empty."""
    for key in list(data):
        field_info = model.model_fields.get(key)
        sub = submodel(field_info.annotation) if field_info else None
        if sub is None:
            continue
        if data[key] is None:
            del data[key]
        elif isinstance(data[key], dict):
            _drop_empty_sections(data[key], sub)


def _leaves(data: Mapping[str, Any], prefix: Loc = ()) -> Iterator[Loc]:
    for key, value in data.items():
        loc = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, loc)
        else:
            yield loc
