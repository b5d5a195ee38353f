"""concur's configuration: one validated :class:`Settings` tree for the whole system.

Sources, highest precedence first:

1. command-line flags (``--set KEY=VALUE`` and command flags such as ``--upstream``),
   passed to :func:`load_settings` as dotted ``overrides``;
2. environment variables: ``CONCUR_`` + section + ``__`` + field, e.g.
   ``CONCUR_UPSTREAM__URL=http://vllm:8000`` or ``CONCUR_POLICY__AIMD__HIGH=0.9``;
3. a config file, TOML (``.toml``) or YAML (``.yaml``/``.yml``), named by ``--config``
   or ``CONCUR_CONFIG``;
4. the defaults below.

Every field carries a ``description``; :func:`render_example` builds the commented
example file from them, so the example never drifts from the code. Errors are
:class:`ConfigError` messages that name each bad field by its dotted path, the
value, what is allowed and where the value came from.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import json
import math
import os
import re
import ssl
import sys
import textwrap
import tomllib
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, Union, get_args, get_origin
from urllib.parse import urlsplit

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from concur.policies.registry import PolicyError, PolicySettings, aimd_params, split_spec

__all__ = [
    "CONFIG_ENV_VAR",
    "ENV_PREFIX",
    "AdmissionSettings",
    "ConfigError",
    "ControlSettings",
    "EngineSettings",
    "ServerSettings",
    "Settings",
    "UpstreamSettings",
    "add_config_arguments",
    "config_file_source",
    "iter_fields",
    "load_settings",
    "parse_listen",
    "parse_set_value",
    "render_effective",
    "render_example",
    "settings_from_args",
]

ENV_PREFIX = "CONCUR_"
ENV_DELIMITER = "__"
CONFIG_ENV_VAR = "CONCUR_CONFIG"
"""Environment variable naming the config file when ``--config`` is not given."""

MASK = "***"
"""What ``config show`` prints instead of a secret."""

DEFAULT_IDENTITY = (
    "header:X-Concur-Agent-Id",
    "header:X-Session-Id",
    "header:session_id",
    "body:session_id",
    "body:user",
)
IDENTITY_BODY_FIELDS = ("session_id", "user")

# RFC 9110 token characters: what a header name may contain.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class ConfigError(ValueError):
    """A configuration that cannot be used. ``problems`` holds one line per bad field."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- models


def _check_http_url(value: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL, without a trailing slash."""
    text = value.strip()
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}); use e.g. http://127.0.0.1:8000") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000"
        )
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    return text.rstrip("/")


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for an https engine that trusts ``ca_file`` too (None: the default)."""
    if ca_file is None:
        return None
    if not os.path.isfile(ca_file):
        raise ValueError(f"{ca_file}: no such file; give a PEM file of CA certificates")
    context = ssl.create_default_context()  # the system's CAs
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"{ca_file}: not a readable PEM file of CA certificates ({exc}); "
            "give the CA that signed the engine's certificate, in PEM"
        ) from None
    return context


def _split_list(value: Any) -> Any:
    """Accept ``"a,b"`` (handy in env vars and ``--set``) where a list is expected."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class UpstreamSettings(_Section):
    """The engine concur forwards to (vLLM, SGLang or llama.cpp's OpenAI server)."""

    url: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the engine's OpenAI-compatible server (http or https).",
    )
    urls: list[str] = Field(
        default_factory=list,
        description="Extra engine URLs, reserved for multi-upstream; the proxy uses url only.",
    )
    connect_timeout: float = Field(
        2.0, gt=0, description="Seconds to wait for a TCP/TLS connection to the engine."
    )
    first_byte_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds to wait for the engine's response headers (long prefills are slow).",
    )
    read_timeout: float = Field(
        600.0, gt=0, description="Longest idle gap, in seconds, between two response chunks."
    )
    ca_file: str | None = Field(
        None,
        description="PEM file of CA certificates to trust, besides the system's, for an "
        "https engine (its OpenAI server and metrics URL).",
    )
    framing: Literal["builtin", "httptools", "aiohttp"] = Field(
        "builtin",
        description="Parser of the engine's responses: concur's own (builtin), llhttp "
        "through httptools, or aiohttp's C parser.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_http_url(v)

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        path = Path(v.strip()).expanduser()
        tls_context(str(path))  # a bad file fails here, at load time, not on the first request
        return str(path)

    @field_validator("urls", mode="before")
    @classmethod
    def _split_urls(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return [_check_http_url(u) for u in v]


LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class ServerSettings(_Section):
    """concur's own HTTP server: the address agents connect to."""

    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(9000, ge=1, le=65535, description="TCP port to listen on.")
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes."
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="On shutdown, seconds to let in-flight requests finish."
    )
    send_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client may read nothing while a response waits for it; then "
        "the connection is closed and the agent's request ends.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for the /concur/ admin endpoints (unset: they answer 403).",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: LogLevel = Field("info", description="Least severe log level printed.")

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v


EngineKind = Literal["vllm", "sglang", "llamacpp"]


class EngineSettings(_Section):
    """How concur reads the engine's load signal."""

    kind: EngineKind = Field("vllm", description="Engine type, which decides how to read it.")
    metrics_url: str | None = Field(
        None,
        description="Metrics URL; unset: upstream.url + /metrics (/slots for llamacpp).",
    )
    poll_interval: float = Field(0.5, gt=0, description="Seconds between two metric scrapes.")
    poll_timeout: float = Field(2.0, gt=0, description="Seconds before one scrape gives up.")
    stale_after: float = Field(
        3.0,
        gt=0,
        description="Seconds without a good scrape before the signal counts as stale.",
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("metrics_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return _check_http_url(v)

    @model_validator(mode="after")
    def _stale(self) -> Self:
        if self.stale_after <= self.poll_interval:
            raise ValueError(
                f"stale_after ({self.stale_after}) must exceed poll_interval "
                f"({self.poll_interval}), or every scrape would look stale"
            )
        return self


class ControlSettings(_Section):
    """The control loop that asks the policy for a new window."""

    interval: float = Field(1.0, gt=0, description="Seconds between two control ticks.")
    failure_mode: Literal["hold", "closed", "open"] = Field(
        "hold",
        description=(
            "When the engine signal is stale: hold the window, closed (admit no new "
            "agents) or open (no limit)."
        ),
    )


class AdmissionSettings(_Section):
    """Which requests belong to which agent, and how waiting agents are treated."""

    identity: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IDENTITY),
        description=(
            "Where to find an agent's id, first match wins: header:<Name>, body:session_id, "
            "body:user."
        ),
    )
    anonymous: Literal["gate", "bypass"] = Field(
        "gate",
        description="Requests without an id: gate them as one-step agents, or bypass the gate.",
    )
    done_header: str = Field(
        "X-Concur-Agent-Done",
        description="Request header that marks an agent's last request (frees its slot).",
    )
    idle_timeout: float = Field(
        300.0, gt=0, description="Seconds without a request before an agent's slot is freed."
    )
    max_queue_wait: float = Field(
        600.0, gt=0, description="Seconds a new agent may wait for a slot before a 429."
    )
    max_queue_len: int = Field(
        10000, ge=0, description="Agents allowed to wait; beyond this a new agent gets 429 at once."
    )
    max_identity_bytes: int = Field(
        256, ge=1, le=65536, description="Longest agent id accepted, in UTF-8 bytes."
    )

    @field_validator("identity", mode="before")
    @classmethod
    def _split_identity(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for i, spec in enumerate(v):
            kind, sep, name = spec.strip().partition(":")
            kind, name = kind.strip().lower(), name.strip()
            if kind == "header" and sep and _TOKEN.match(name):
                norm = f"header:{name}"
            elif kind == "body" and name in IDENTITY_BODY_FIELDS:
                norm = f"body:{name}"
            else:
                raise ValueError(
                    f"entry {i} ({spec!r}) must be header:<Name> (a valid header name) "
                    f"or one of {', '.join('body:' + f for f in IDENTITY_BODY_FIELDS)}"
                )
            if norm.lower() in (o.lower() for o in out):
                raise ValueError(f"entry {i} ({spec!r}) is listed twice")
            out.append(norm)
        return out

    @field_validator("done_header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not _TOKEN.match(v.strip()):
            raise ValueError("must be a valid HTTP header name (letters, digits, '-', ...)")
        return v.strip()

    def identity_sources(self) -> list[tuple[Literal["header", "body"], str]]:
        """``identity`` parsed: ``[("header", "X-Session-Id"), ("body", "user"), ...]``."""
        out: list[tuple[Literal["header", "body"], str]] = []
        for spec in self.identity:
            kind, _, name = spec.partition(":")
            out.append(("header" if kind == "header" else "body", name))
        return out


SECTIONS = ("upstream", "server", "engine", "control", "admission", "policy")


class _SettingsTree(BaseModel):
    """The settings tree as a plain model: validates a mapping already merged from sources."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    upstream: UpstreamSettings = Field(
        default_factory=UpstreamSettings, description=UpstreamSettings.__doc__ or ""
    )
    server: ServerSettings = Field(
        default_factory=ServerSettings, description=ServerSettings.__doc__ or ""
    )
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description=EngineSettings.__doc__ or ""
    )
    control: ControlSettings = Field(
        default_factory=ControlSettings, description=ControlSettings.__doc__ or ""
    )
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings, description=AdmissionSettings.__doc__ or ""
    )
    policy: PolicySettings = Field(
        default_factory=PolicySettings,
        description="The admission policy (name) and every policy's parameters.",
    )

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: PolicySettings) -> PolicySettings:
        _check_policy(v)
        return v


class Settings(BaseSettings, _SettingsTree):
    """Everything concur can be configured with. Build it with :func:`load_settings`.

    ``Settings()`` alone reads ``CONCUR_*`` from the process environment and the file
    named by ``$CONCUR_CONFIG``; keyword arguments take precedence over both.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        validate_assignment=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """``Settings(**kwargs)``: kwargs > ``CONCUR_*`` env > ``$CONCUR_CONFIG`` file."""
        env = _MappingEnvSource(settings_cls, os.environ)
        path = os.environ.get(CONFIG_ENV_VAR)
        files = () if not path else (config_file_source(settings_cls, Path(path), CONFIG_ENV_VAR),)
        return (init_settings, env, *files)

    def metrics_url(self) -> str:
        """Where the poller scrapes: ``engine.metrics_url``, or derived from ``upstream.url``."""
        if self.engine.metrics_url:
            return self.engine.metrics_url
        return self.upstream.url + ("/slots" if self.engine.kind == "llamacpp" else "/metrics")

    def gate_options(self) -> dict[str, float | int]:
        """Keyword arguments for :class:`concur.admission.AdmissionGate` (besides the clock)."""
        return {
            "max_queue_len": self.admission.max_queue_len,
            "max_queue_wait": self.admission.max_queue_wait,
            "idle_timeout": self.admission.idle_timeout,
        }


def _check_policy(v: PolicySettings) -> None:
    """The policy name must build, and an aimd preset must stay valid with explicit params."""

    def fail(loc: tuple[str, ...], value: Any, reason: str) -> ValidationError:
        err = PydanticCustomError("policy", "{reason}", {"reason": reason})
        return ValidationError.from_exception_data(
            "PolicySettings", [InitErrorDetails(type=err, loc=loc, input=value)]
        )

    try:
        name, arg = split_spec(v.name)
    except PolicyError as exc:
        raise fail(("name",), v.name, str(exc)) from None
    if name == "aimd":
        preset = arg or "default"
        try:
            aimd_params(v.aimd, preset)
        except PolicyError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                why = "; ".join(_strip_value_error(e["msg"]) for e in cause.errors())
                raise fail(
                    ("aimd",),
                    v.aimd.model_dump(include=v.aimd.model_fields_set),
                    f"with preset aimd:{preset} these settings give: {why}",
                ) from None
            raise fail(("name",), v.name, str(exc)) from None
    elif name == "static" and arg is not None:
        if not arg.isdigit() or int(arg) < 1:
            raise fail(("name",), v.name, f"static:N needs a whole number N >= 1, got {arg!r}")
    elif arg is not None:
        raise fail(("name",), v.name, f"policy {name!r} takes no ':' argument")


# -------------------------------------------------------------------------- sources


class _MappingEnvSource(EnvSettingsSource):
    """The env source over any mapping, lenient where a list is given as ``a,b``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = {k if self.case_sensitive else k.lower(): v for k, v in self._environ.items()}
        if self.env_ignore_empty:
            env = {k: v for k, v in env.items() if v != ""}
        return env

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        # Not JSON: hand the raw text to the field's validators ("kv,working_set", "a,b").
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


def config_file_source(
    settings_cls: type[BaseSettings], path: Path, origin: str | None = None
) -> PydanticBaseSettingsSource:
    """A TOML or YAML file source, by suffix. Raises :class:`ConfigError` if unusable."""
    given = f" (from {origin})" if origin else ""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"config file {path}{given}: unknown type {path.suffix or '(no suffix)'!r}; "
            "name it *.toml, *.yaml or *.yml"
        )
    if not path.exists():
        raise ConfigError(f"config file {path}{given}: not found")
    if not path.is_file():
        raise ConfigError(f"config file {path}{given}: not a regular file")
    source: TomlConfigSettingsSource | YamlConfigSettingsSource | None
    try:
        if suffix == ".toml":
            source = TomlConfigSettingsSource(settings_cls, toml_file=path)
        else:
            source = YamlConfigSettingsSource(settings_cls, yaml_file=path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}{given}: invalid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file {path}{given}: invalid YAML: {detail}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}{given}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}{given}: cannot read: {exc.strerror}") from None
    except (TypeError, ValueError):  # a YAML list or scalar where the sections should be
        source = None
    if source is None or (
        isinstance(source, YamlConfigSettingsSource) and not isinstance(source.yaml_data, dict)
    ):
        raise ConfigError(
            f"config file {path}{given}: the top level must be a mapping of sections "
            "(upstream:, server:, ...)"
        )
    if isinstance(source, YamlConfigSettingsSource):
        _drop_empty_sections(source.init_kwargs, Settings)
    return source


def _drop_empty_sections(data: dict[str, Any], model: type[BaseModel]) -> None:
    """YAML ``section:`` with every child commented out reads as null: treat it as empty."""
    for key in list(data):
        field = model.model_fields.get(key)
        sub = _model_type(field.annotation) if field else None
        if sub is None:
            continue
        if data[key] is None:
            del data[key]
        elif isinstance(data[key], dict):
            _drop_empty_sections(data[key], sub)


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


# ---------------------------------------------------------------------- provenance

Path_ = tuple[str | int, ...]


class _Layer:
    """One source's values, and where each came from, for error messages."""

    def __init__(self, data: Mapping[str, Any], origins: dict[Path_, str]) -> None:
        self.data = data
        self.origins = origins

    def origin(self, path: Path_) -> str | None:
        """The label of the longest key in this layer that is ``path`` or a prefix of it."""
        for n in range(len(path), 0, -1):
            label = self.origins.get(path[:n])
            if label is not None:
                return label
        return None

    def under(self, path: Path_) -> Iterator[tuple[Path_, str]]:
        for key, label in self.origins.items():
            if key[: len(path)] == path or path[: len(key)] == key:
                yield key, label


def _leaves(data: Mapping[str, Any], prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def _env_layer(environ: Mapping[str, str], data: Mapping[str, Any]) -> _Layer:
    origins: dict[Path_, str] = {}
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV_VAR:
            continue
        rest = name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        if rest[0] in SECTIONS:
            origins[tuple(rest)] = name
    return _Layer(data, origins)


def _check_env_names(environ: Mapping[str, str]) -> None:
    """Catch ``CONCUR_UPSTREAM_URL`` (one underscore) and unknown sections: not silently ignored."""
    problems = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV_VAR:
            continue
        rest = upper[len(ENV_PREFIX) :]
        head = rest.split(ENV_DELIMITER)[0].lower()
        if ENV_DELIMITER in rest and head not in SECTIONS:
            problems.append(
                f"{name} (environment): unknown section {head!r}; allowed: {', '.join(SECTIONS)}"
            )
            continue
        for section in SECTIONS:
            tag = section.upper()
            if rest.startswith(tag + "_") and not rest.startswith(tag + ENV_DELIMITER):
                fixed = f"{ENV_PREFIX}{tag}{ENV_DELIMITER}{rest[len(tag) + 1 :]}"
                problems.append(
                    f"{name} (environment): sections and fields are joined by a double "
                    f"underscore: use {fixed}"
                )
    if problems:
        raise ConfigError(problems)


def _nest(overrides: Mapping[str, Any], label: str | None = None) -> tuple[dict[str, Any], _Layer]:
    """``{"policy.aimd.high": 0.9}`` -> ``{"policy": {"aimd": {"high": 0.9}}}``."""
    nested: dict[str, Any] = {}
    origins: dict[Path_, str] = {}
    for key, value in overrides.items():
        parts = key.replace(ENV_DELIMITER, ".").split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override key {key!r}: use dotted names like policy.aimd.high")
        parts = [p.strip().lower() for p in parts]
        node = nested
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        origins[tuple(parts)] = label or "override"
    return nested, _Layer(nested, origins)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -------------------------------------------------------------------------- errors


def _strip_value_error(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _dotted(loc: Path_) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _model_at(loc: Path_) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        field = model.model_fields.get(part)
        model = _model_type(field.annotation) if field else None
    return model


def _show(value: Any, from_env: bool) -> str:
    if from_env and isinstance(value, str):
        return value
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str | int | float | bool | list | tuple | dict) or value is None:
        return json.dumps(value, default=str)
    return repr(value)


def _reason(err: Mapping[str, Any], loc: Path_) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind in ("string_type", "string_sub_type"):
        return "must be a string"
    if kind == "string_too_short":
        return "must not be empty"
    if kind in ("list_type", "tuple_type"):
        return "must be a list"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a table of settings (a mapping), not a single value"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "none"
        return f"unknown setting; allowed here: {allowed}"
    return _strip_value_error(str(err["msg"]))


def _format_errors(exc: ValidationError, layers: Sequence[_Layer]) -> ConfigError:
    problems = []
    for err in exc.errors():
        loc: Path_ = tuple(p for p in err["loc"] if isinstance(p, int) or "[" not in p)
        path = _dotted(loc) or "(top level)"
        origin = next((o for o in (la.origin(loc) for la in layers) if o), None)
        if origin is None:  # e.g. an unknown table: name the key that introduced it
            origin = next((label for la in layers for _k, label in la.under(loc)), None)
        reason = _reason(err, loc)
        value = err.get("input")
        composite = isinstance(value, Mapping) and err["type"] != "extra_forbidden"
        if composite:
            # A cross-field check: say where each field involved came from.
            sources: list[str] = []
            for layer in layers:
                for key, label in layer.under(loc):
                    dotted = _dotted(key)
                    if dotted not in (s.split(" ")[0] for s in sources):
                        sources.append(f"{dotted} from {label}")
            detail = f" [{'; '.join(sources)}]" if sources else " [defaults]"
            problems.append(f"{path}: {reason}{detail}")
        else:
            # Env vars and --set values are text as typed: show them as typed.
            from_env = origin is not None and (
                origin.upper().startswith(ENV_PREFIX) or origin.startswith("--set")
            )
            where = f" (from {origin})" if origin else ""
            problems.append(f"{path} = {_show(value, from_env)}{where}: {reason}")
    return ConfigError(problems)


# ---------------------------------------------------------------------------- load


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings`: overrides > env > config file > defaults.

    ``config_file`` defaults to ``$CONCUR_CONFIG`` (looked up in ``env``). ``overrides``
    use dotted keys (``{"policy.aimd.high": 0.9}``). ``env`` defaults to ``os.environ``.
    Raises :class:`ConfigError` naming every bad field, its value and its source.
    """
    nested, layer = _nest(overrides or {})
    return _load(config_file, [(nested, layer)], env)


def _load(
    config_file: Path | None,
    override_layers: Sequence[tuple[dict[str, Any], _Layer]],
    env: Mapping[str, str] | None,
) -> Settings:
    environ: Mapping[str, str] = os.environ if env is None else env
    _check_env_names(environ)
    origin = None
    if config_file is None and environ.get(CONFIG_ENV_VAR):
        config_file, origin = Path(environ[CONFIG_ENV_VAR]), CONFIG_ENV_VAR
    file_source = None if config_file is None else config_file_source(Settings, config_file, origin)
    env_source = _MappingEnvSource(Settings, environ)

    # override_layers come lowest precedence first; layers (for error sources) highest first.
    init: dict[str, Any] = {}
    for nested, _layer in override_layers:
        init = _deep_merge(init, nested)
    layers = [layer for _nested, layer in reversed(override_layers)]
    try:
        env_data = env_source()
        layers.append(_env_layer(environ, env_data))
        if file_source is not None:
            file_data = file_source()
            label = str(config_file)
            layers.append(_Layer(file_data, {p: label for p, _ in _leaves(file_data)}))
            merged = _deep_merge(file_data, env_data)
        else:
            merged = dict(env_data)
        merged = _deep_merge(merged, init)
        # Validate the merged tree as a plain model, then wrap it as Settings without
        # running Settings' own sources again (they would read os.environ and
        # $CONCUR_CONFIG, not the env and file this call was given).
        tree = _SettingsTree.model_validate(merged)
        values = {name: getattr(tree, name) for name in _SettingsTree.model_fields}
        return Settings.model_construct(_fields_set=set(tree.model_fields_set), **values)
    except ValidationError as exc:
        raise _format_errors(exc, layers) from None
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc}") from None


# ----------------------------------------------------------------------------- CLI


def parse_set_value(text: str) -> Any:
    """A ``--set`` value: JSON lists, objects, null and quoted strings are decoded;
    anything else stays text (numbers and booleans are converted by the field's type,
    so ``server.admin_token=123`` stays the string ``"123"``)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if value is None or isinstance(value, list | dict):
        return value
    if isinstance(value, str):
        return value
    return text


def parse_listen(value: str) -> tuple[str, int]:
    """``"0.0.0.0:9000"``, ``"[::1]:9000"``, ``":9000"`` (host kept) -> ``(host, port)``.

    An empty host means "keep the configured one" and is returned as ``""``.
    """
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"--listen = {value!r}: expected HOST:PORT, e.g. 0.0.0.0:9000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--listen = {value!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH`` and repeatable ``--set KEY=VALUE`` to a command's parser."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML or YAML config file (default: ${CONFIG_ENV_VAR}, if set)",
    )
    group.add_argument(
        "--set",
        dest="config_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override one setting by dotted key, e.g. --set policy.aimd.high=0.9; "
            "repeatable; the value is read as JSON when it parses, else as text"
        ),
    )


def _set_layer(items: Sequence[str]) -> tuple[dict[str, Any], _Layer]:
    nested: dict[str, Any] = {}
    origins: dict[Path_, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set upstream.url=...")
        one, layer = _nest({key.strip(): parse_set_value(raw)}, f"--set {key.strip()}")
        nested = _deep_merge(nested, one)
        origins.update(layer.origins)
    return nested, _Layer(nested, origins)


def settings_from_args(args: argparse.Namespace, /, **flag_overrides: Any) -> Settings:
    """Settings for a command: its flags > ``--set`` > env > ``--config`` file > defaults.

    ``flag_overrides`` map dotted keys (or ``section__field``) to command flag values;
    ``None`` means the flag was not given. ``listen="host:port"`` sets server.host/port.
    On a bad configuration, prints the problems to stderr and raises ``SystemExit(2)``.
    """
    try:
        flags: dict[str, Any] = {}
        for key, value in flag_overrides.items():
            if value is None:
                continue
            if key == "listen":
                host, port = parse_listen(str(value))
                if host:
                    flags["server.host"] = host
                flags["server.port"] = port
            else:
                flags[key.replace(ENV_DELIMITER, ".")] = value
        flag_nested, flag_layer = _nest(flags)
        flag_layer.origins = {p: f"command-line flag for {_dotted(p)}" for p in flag_layer.origins}
        layers = [_set_layer(getattr(args, "config_set", None) or []), (flag_nested, flag_layer)]
        return _load(getattr(args, "config", None), layers, None)
    except ConfigError as exc:
        print("concur: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


# -------------------------------------------------------------------------- render


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _attribute_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Docstrings written under fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``), first line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in itertools.pairwise(body):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value).split("\n\n")[0]
    return docs


# For policy parameters documented neither by description= nor an attribute docstring.
_FALLBACK_DOCS = {
    "AIMDParams.initial_window": "Window at start, before any feedback.",
    "AIMDParams.min_window": "Never shrink the window below this many agents.",
    "AIMDParams.max_window": "Never grow the window above this many agents.",
    "FitParams.pressure": "Sources of pressure, combined by max.",
    "FitParams.high": "Pause the newest live agents while pressure is above this.",
    "FitParams.low": "Admit or resume an agent only while pressure with its context stays <= this.",
    "FitParams.pause": "Step-boundary pausing of the newest live agents while pressure is high.",
    "EPPParams.kv_threshold": "Hold every request while engine KV usage is above this.",
    "EPPParams.queue_threshold": "Hold every request while more requests than this wait.",
    "PolicySettings.aimd": "Parameters of aimd (values set here override an aimd:<preset>).",
    "PolicySettings.static": "Parameters of static (static:N overrides window).",
    "PolicySettings.fit": "Parameters of fit: admit what fits, pause the newest when over.",
    "PolicySettings.epp": "Parameters of epp, a request-level gate (comparison baseline).",
}


def _doc(model: type[BaseModel], name: str, field: FieldInfo, docs: dict[str, str]) -> str:
    text = (
        field.description
        or docs.get(name)
        or _FALLBACK_DOCS.get(f"{model.__name__}.{name}")
        or "(undocumented)"
    )
    return " ".join(text.replace("``", "").split())


def _constraints(field: FieldInfo) -> list[str]:
    annotation, optional = _unwrap(field.annotation)
    hints: list[str] = []
    if get_origin(annotation) is Literal:
        hints.append("one of " + ", ".join(map(str, get_args(annotation))))
    elif get_origin(annotation) in (list, tuple):
        inner = get_args(annotation)[0] if get_args(annotation) else None
        if get_origin(inner) is Literal:
            hints.append("list of " + ", ".join(map(str, get_args(inner))))
    for meta in field.metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                hints.append(f"{op} {getattr(meta, attr)}")
    if optional:
        hints.append("optional")
    return hints


def _toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return _toml_value(MASK)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _env_name(path: Sequence[str]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(p.upper() for p in path)


def _example_table(model: type[BaseModel], path: list[str], out: list[str]) -> None:
    docs = _attribute_docs(model)
    subtables = []
    for name, field in model.model_fields.items():
        sub = _model_type(field.annotation)
        if sub is not None:
            subtables.append((name, field, sub))
            continue
        hints = [*_constraints(field), "env " + _env_name([*path, name])]
        out.append(f"# {_doc(model, name, field, docs)} [{'; '.join(hints)}]")
        default = field.get_default(call_default_factory=True)
        rendered = "(unset)" if default is None else _toml_value(default)
        out.append(f"# {name} = {rendered}")
    for name, field, sub in subtables:
        out.append("")
        out.append(f"# {_doc(model, name, field, docs)}")
        out.append(f"[{'.'.join([*path, name])}]")
        _example_table(sub, [*path, name], out)


def render_example() -> str:
    """A commented example config file (TOML) with every field, its default and meaning.

    Every value is commented out, so the file as printed gives exactly the defaults;
    uncomment a line to change it. Built from the models, so it never drifts.
    """
    out = [
        "# concur example configuration (TOML). Generated by `concur config example`.",
        "# Every setting is shown commented out with its default; uncomment to change it.",
        "# Precedence: command-line flags and --set > CONCUR_* environment variables",
        f"# > this file (--config PATH or ${CONFIG_ENV_VAR}) > defaults.",
        "# Environment: CONCUR_<SECTION>__<FIELD>, e.g. CONCUR_POLICY__AIMD__HIGH=0.9.",
    ]
    _example_table(Settings, [], out)
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


def _effective_data(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(mode="python")
    token = settings.server.admin_token
    data["server"]["admin_token"] = None if token is None else MASK
    name, arg = split_spec(settings.policy.name)
    if name == "aimd":
        # Show what runs: the preset merged with the explicitly set parameters.
        resolved = aimd_params(settings.policy.aimd, arg or "default")
        data["policy"]["aimd"] = resolved.model_dump(mode="python")
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _toml_table(data: Mapping[str, Any], path: list[str], out: list[str]) -> None:
    tables = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is None:
            out.append(f"# {key} = (unset)")
        else:
            out.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        if out:
            out.append("")
        out.append(f"[{'.'.join([*path, key])}]")
        _toml_table(value, [*path, key], out)


def render_effective(
    settings: Settings, fmt: Literal["toml", "yaml", "json"] | str = "toml"
) -> str:
    """The effective configuration as TOML, YAML or JSON, with the admin token masked.

    ``policy.aimd`` shows the parameters that run: an ``aimd:<preset>``'s values merged
    with the explicitly set ones.
    """
    data = _jsonable(_effective_data(settings))
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if fmt == "toml":
        out = ["# concur effective configuration (concur config show)"]
        _toml_table(data, [], out)
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {fmt!r}; allowed: toml, yaml, json")


def iter_fields(
    model: type[BaseModel] = Settings, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every leaf field of the settings tree, as (dotted path parts, field info)."""
    for name, field in model.model_fields.items():
        sub = _model_type(field.annotation)
        if sub is not None:
            yield from iter_fields(sub, (*path, name))
        else:
            yield (*path, name), field
