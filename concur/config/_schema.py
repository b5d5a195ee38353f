"""The settings tree: one model per section, and :class:`Settings` over them all.

Each field's docstring is its documentation (``use_attribute_docstrings``): what
``concur config example`` prints above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from concur._idle import IdleRule
from concur._priority import EnginePriority
from concur.config import _checks
from concur.config._errors import bare
from concur.config._sources import ENV_DELIMITER, ENV_PREFIX, settings_sources
from concur.identity import DEFAULT_SOURCES
from concur.policies.registry import PolicyError, PolicySettings, aimd_params, split_spec


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


_LOWER = BeforeValidator(_lower)


class UpstreamSettings(_Section):
    """The engine concur forwards to (vLLM, SGLang or llama.cpp's OpenAI server)."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the engine's OpenAI-compatible server (http or https)."""
    connect_timeout: float = Field(2.0, gt=0)
    """Seconds to wait for a TCP/TLS connection to the engine."""
    first_byte_timeout: float = Field(600.0, gt=0)
    """Seconds to wait for the engine's response headers (long prefills are slow)."""
    read_timeout: float = Field(600.0, gt=0)
    """Longest idle gap, in seconds, between two response chunks."""
    ca_file: str | None = None
    """PEM file of CA certificates to trust, besides the system's, for an https engine
    (its OpenAI server and metrics URL)."""
    framing: Literal["builtin", "httptools", "aiohttp"] = "httptools"
    """Parser of the engine's responses: llhttp through httptools (the default: as cheap as
    concur's own parser or cheaper in bench/proxy_overhead.py), aiohttp's C parser, or
    concur's own (builtin)."""
    keepalive: float = Field(4.0, gt=0, le=3600)
    """Seconds an idle connection to the engine is kept for reuse; set it under the
    engine's own keep-alive (uvicorn's, vLLM's: 5 s). An engine that sends Keep-Alive:
    timeout=N shortens it to about N - 1."""
    max_connections: int = Field(1024, ge=1, le=65536)
    """Most connections open to the engine at once; past it a request waits for one to
    be released (within first_byte_timeout)."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _checks.http_url(v)

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        path = Path(v.strip()).expanduser()
        _checks.tls_context(str(path))  # a bad file fails at load time, not on a request
        return str(path)


LogLevel = Literal["debug", "info", "warning", "error", "critical"]
EngineKind = Literal["vllm", "sglang", "llamacpp"]


class ServerSettings(_Section):
    """concur's own HTTP server: the address agents connect to."""

    host: str = Field("127.0.0.1", min_length=1)
    """Address to listen on."""
    port: int = Field(9000, ge=1, le=65535)
    """TCP port to listen on."""
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest request body accepted, in bytes."""
    max_held_bytes: int = Field(1024 * 1024 * 1024, ge=0)
    """Budget, in bytes, of the agent steps' request bodies concur holds (being read,
    queued or held at the gate, in flight); a new agent whose body would pass it gets
    503 with Retry-After at once. 0: no budget; else at least max_body_bytes."""
    drain_timeout: float = Field(30.0, ge=0)
    """On shutdown, seconds to let in-flight requests finish."""
    send_timeout: float = Field(60.0, gt=0)
    """Seconds a client may read nothing while a response waits for it; then the
    connection is closed and the agent's request ends."""
    admin_token: SecretStr | None = None
    """Bearer token for the /concur/ admin endpoints (unset: they answer 403)."""
    log_format: Annotated[Literal["text", "json"], _LOWER] = "text"
    """Log line format."""
    log_level: Annotated[LogLevel, _LOWER] = "info"
    """Least severe log level printed."""

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _held_budget(self) -> Self:
        if 0 < self.max_held_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_held_bytes ({self.max_held_bytes}) must be 0 (no budget) or at least "
                f"max_body_bytes ({self.max_body_bytes}), or a body that is accepted could "
                "never wait"
            )
        return self


class EngineSettings(_Section):
    """How concur reads the engine's load signal."""

    kind: Annotated[EngineKind, _LOWER] = "vllm"
    """Engine type, which decides how to read it."""
    metrics_url: str | None = None
    """Metrics URL; unset: upstream.url + /metrics (/slots for llamacpp)."""
    poll_interval: float = Field(0.5, gt=0)
    """Seconds between two metric scrapes."""
    poll_timeout: float = Field(2.0, gt=0)
    """Seconds before one scrape gives up."""
    stale_after: float = Field(3.0, gt=0)
    """Seconds without a good scrape before the signal counts as stale."""

    @field_validator("metrics_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return _checks.http_url(v)

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

    interval: float = Field(1.0, gt=0)
    """Seconds between two control ticks."""
    failure_mode: Literal["hold", "closed", "open"] = "hold"
    """When the engine signal is stale: hold the window, closed (admit no new agents) or
    open (no limit)."""


class AdmissionSettings(_Section):
    """Which requests belong to which agent, and how waiting agents are treated."""

    identity: list[str] = Field(default_factory=lambda: list(DEFAULT_SOURCES))
    """Where to find an agent's id, first match wins: header:<Name>, body:session_id,
    body:user. Not body:user by default: OpenAI's user field names an end user (for
    abuse monitoring), not a session, so ordinary one-off requests would hold slots and
    one user's parallel sessions would fold into one agent; add it when your clients
    send one user per agent. A session id (X-Session-Id, session_id) is an agent: one
    that sends a single request ends after idle_timeout_new."""
    anonymous: Literal["gate", "bypass"] = "bypass"
    """Requests without an id: bypass the gate (they never wait and hold no slot), or
    gate them as one-step agents that queue like new agents when the window is full.
    bypass is the default so a plain curl or an SDK call without an agent id is never
    held; choose gate when most of the engine's load comes without ids."""
    done_header: str = "X-Concur-Agent-Done"
    """Request header that marks an agent's last request (frees its slot)."""
    idle_timeout: float = Field(300.0, gt=0)
    """The longest, in seconds, any agent keeps its slot without a request; it caps the
    adaptive timeout below (idle_timeout_min, idle_pause_factor, idle_timeout_new), so
    setting it alone, lower than those, gives a fixed timeout."""
    idle_timeout_min: float = Field(15.0, gt=0)
    """The least, in seconds, an agent that has paused before keeps its slot idle."""
    idle_pause_factor: float = Field(4.0, ge=0, le=1000)
    """An agent's idle timeout is this many times its longest pause so far between a
    response and its next request (its tool calls), within idle_timeout_min and
    idle_timeout: an agent idle far beyond its own pauses is gone (a crashed harness, a
    killed worker), one in a long tool call it has made before is not. 0: a fixed
    idle_timeout for every agent."""
    idle_timeout_new: float = Field(30.0, gt=0)
    """Idle timeout, in seconds, of an agent that has not come back after a response
    yet (a one-off request looks like that), within idle_timeout."""
    disconnect_grace: float = Field(5.0, ge=0, le=3600)
    """Seconds an agent keeps its slot after its client hung up on a request (closed the
    connection before the response ended): a new request within them keeps the agent,
    else its slot is freed (a killed client frees its slot in seconds, not minutes)."""
    max_queue_wait: float = Field(60.0, gt=0)
    """Seconds a new agent (or a held request) may wait for a slot before a 429 that says
    why it waited. Well under the openai SDK's 600 s timeout, its two retries included."""
    retry_after: float = Field(5.0, ge=1, le=60)
    """Seconds the Retry-After header of a 429 (queue full or timed out) asks a client to
    wait before it retries (the openai SDK honours up to 60)."""
    max_queue_len: int = Field(10000, ge=0)
    """Agents allowed to wait; beyond this a new agent gets 429 at once."""
    max_identity_bytes: int = Field(256, ge=1, le=65536)
    """Longest agent id accepted, in UTF-8 bytes."""
    engine_priority: EnginePriority = "auto"
    """The priority concur writes in each agent step's body for the engine (vLLM's
    priority field, served lowest first by a vLLM started with --scheduling-policy
    priority; its default scheduler ignores it). fewest-steps: the steps the agent has
    done, so a late agent is not queued behind ones far along (the critical path of a
    staggered swarm); off: none; auto: fewest-steps for engine.kind vllm, off for the
    others. A request that sets its own priority keeps it."""

    @field_validator("identity", mode="before")
    @classmethod
    def _split_identity(cls, v: Any) -> Any:
        return _checks.split_list(v)

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: list[str]) -> list[str]:
        return _checks.identity_specs(v)

    @field_validator("done_header")
    @classmethod
    def _header(cls, v: str) -> str:
        return _checks.header_name(v)

    def identity_sources(self) -> list[tuple[Literal["header", "body"], str]]:
        """``identity`` parsed: ``[("header", "X-Session-Id"), ("body", "user"), ...]``."""
        out: list[tuple[Literal["header", "body"], str]] = []
        for spec in self.identity:
            kind, _, name = spec.partition(":")
            out.append(("header" if kind == "header" else "body", name))
        return out


class Settings(BaseSettings):
    """Everything concur can be configured with. Build it with ``load_settings``.

    ``Settings()`` alone reads ``CONCUR_*`` from the process environment and the file
    named by ``$CONCUR_CONFIG``; keyword arguments take precedence over both.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
    )

    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    """The engine concur forwards to (vLLM, SGLang or llama.cpp's OpenAI server)."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    """concur's own HTTP server: the address agents connect to."""
    engine: EngineSettings = Field(default_factory=EngineSettings)
    """How concur reads the engine's load signal."""
    control: ControlSettings = Field(default_factory=ControlSettings)
    """The control loop that asks the policy for a new window."""
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    """Which requests belong to which agent, and how waiting agents are treated."""
    policy: PolicySettings = Field(default_factory=PolicySettings)
    """The admission policy (name) and every policy's parameters."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the sources of ``concur.config._sources``."""
        return settings_sources(settings_cls, init_settings)

    @field_validator("policy")
    @classmethod
    def _aimd_preset(cls, v: PolicySettings) -> PolicySettings:
        """An ``aimd:<preset>`` must stay valid with the aimd parameters set explicitly."""
        name, preset = split_spec(v.name)
        if name != "aimd" or preset is None:
            return v
        try:
            aimd_params(v.aimd, preset)
        except PolicyError as exc:
            cause = exc.__cause__
            why = (
                "; ".join(bare(e["msg"]) for e in cause.errors())
                if isinstance(cause, ValidationError)
                else str(exc)
            )
            reason = f"with preset aimd:{preset} these settings give: {why}"
            error = PydanticCustomError("policy", "{reason}", {"reason": reason})
            explicit = v.aimd.model_dump(include=v.aimd.model_fields_set)
            raise ValidationError.from_exception_data(
                "PolicySettings", [InitErrorDetails(type=error, loc=("aimd",), input=explicit)]
            ) from None
        return v

    def metrics_url(self) -> str:
        """Where the poller scrapes: ``engine.metrics_url``, or derived from ``upstream.url``."""
        if self.engine.metrics_url:
            return self.engine.metrics_url
        return self.upstream.url + ("/slots" if self.engine.kind == "llamacpp" else "/metrics")

    def gate_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`concur.admission.AdmissionGate` (besides the clock)."""
        adm = self.admission
        longest = adm.idle_timeout
        return {
            "max_queue_len": adm.max_queue_len,
            "max_queue_wait": adm.max_queue_wait,
            "retry_after": adm.retry_after,
            "idle": IdleRule(
                longest=longest,
                shortest=min(adm.idle_timeout_min, longest),
                factor=adm.idle_pause_factor,
                first=min(adm.idle_timeout_new, longest),
                disconnect_grace=adm.disconnect_grace,
            ),
        }
