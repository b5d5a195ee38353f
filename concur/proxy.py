"""The request path: four layers, in this order, each a module with one job.

Every request that is not one of concur's own endpoints lands in
:meth:`Proxy.handle` and goes to the configured upstream with its method, path,
query, body and end-to-end headers. Only *agent steps* are gated:
``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST /v1/responses``
(:data:`GATED_PATHS`, a trailing slash ignored); everything else (``GET /v1/models``,
``/tokenize``, embeddings, health checks, ...) is forwarded straight through, never
queued.

1. **inspect** (``concur._inspect``): read the body; for a step, find its agent, its
   done marker and a prompt estimate, and inject ``stream_options.include_usage``;
2. **admit** (``concur._admit``): wait at the gate for a :class:`~concur.Permit`,
   which travels with the request and is released on every path; once granted, a
   step gets its engine-side priority (``concur._priority``);
3. **forward** (``concur._forward``): send it upstream under the upstream timeouts;
4. **relay** (``concur._relay``): stream the response back, reading the engine's
   usage on the way and cutting off a client that stopped reading.

A client that goes away cancels the handler; the upstream response is then closed
at once and the permit released.
"""

from __future__ import annotations

import itertools
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from concur import _priority
from concur._admit import Permit, refusal
from concur._budget import ByteBudget, header_agent, new_agent
from concur._forward import Forwarder
from concur._inspect import GATED_PATHS, BodyTooLarge, Inspector, Step
from concur._relay import REQUEST_ID_HEADER, Relayer
from concur.admission import AdmissionError, AdmissionGate
from concur.config import AdmissionSettings, EngineSettings, ServerSettings, UpstreamSettings
from concur.identity import DEFAULT_SOURCES, IdentityError, IdentitySource
from concur.metrics import ConcurMetrics
from concur.upstream import Framing, Upstream

__all__ = ["GATED_PATHS", "REQUEST_ID_HEADER", "Proxy", "ProxyOptions", "RequestIds"]


# ProxyOptions' defaults are the config's: one place for each.
_UPSTREAM_DEFAULTS = UpstreamSettings()
_SERVER_DEFAULTS = ServerSettings()
_ADMISSION_DEFAULTS = AdmissionSettings()
_ENGINE_DEFAULTS = EngineSettings()


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """What the proxy needs from the configuration."""

    upstream: str
    connect_timeout: float | None = _UPSTREAM_DEFAULTS.connect_timeout
    first_byte_timeout: float | None = _UPSTREAM_DEFAULTS.first_byte_timeout
    """Seconds until the upstream's response headers (a non-streaming generation's whole run)."""
    read_timeout: float | None = _UPSTREAM_DEFAULTS.read_timeout
    """Seconds of upstream silence allowed between two body chunks."""
    send_timeout: float = _SERVER_DEFAULTS.send_timeout
    """Seconds one write may wait for a client that stopped reading."""
    max_body_bytes: int = _SERVER_DEFAULTS.max_body_bytes
    max_held_bytes: int = _SERVER_DEFAULTS.max_held_bytes
    """Budget of the agent steps' bodies held (``server.max_held_bytes``; 0: none)."""
    identity: tuple[str | IdentitySource, ...] = DEFAULT_SOURCES
    max_identity_bytes: int = _ADMISSION_DEFAULTS.max_identity_bytes
    anonymous: Literal["gate", "bypass"] = _ADMISSION_DEFAULTS.anonymous
    done_header: str = _ADMISSION_DEFAULTS.done_header
    gated_paths: frozenset[str] = field(default=GATED_PATHS)
    ssl_context: ssl.SSLContext | None = None
    """TLS for an https upstream (None: the system's CAs)."""
    framing: Framing = _UPSTREAM_DEFAULTS.framing
    """The upstream client's response parser (``upstream.framing``)."""
    keepalive: float = _UPSTREAM_DEFAULTS.keepalive
    """Seconds an upstream connection may stay idle (``upstream.keepalive``)."""
    max_connections: int = _UPSTREAM_DEFAULTS.max_connections
    """Cap on open upstream connections (``upstream.max_connections``)."""
    engine_priority: bool = _priority.enabled(
        _ADMISSION_DEFAULTS.engine_priority, _ENGINE_DEFAULTS.kind
    )
    """Stamp agent steps with the engine-side priority, fewest steps first
    (``admission.engine_priority``; :mod:`concur._priority`)."""


class RequestIds:
    """Unique request ids (32 hex digits, like a UUID's): a random prefix and a counter.

    As unique as ``uuid4().hex`` within a process and across processes, at a
    fraction of its cost on the request path.
    """

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._next = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._next) & 0xFFFFFFFFFFFFFFFF:016x}"


class Proxy:
    """The request path's layers, put in order (see the module docstring)."""

    def __init__(
        self,
        options: ProxyOptions,
        gate: AdmissionGate,
        metrics: ConcurMetrics,
        upstream: Upstream | None = None,
    ) -> None:
        self.options = options
        self.gate = gate
        self.metrics = metrics
        self.inspector = Inspector(
            identity=options.identity,
            max_identity_bytes=options.max_identity_bytes,
            anonymous=options.anonymous,
            done_header=options.done_header,
            gated_paths=options.gated_paths,
            max_body_bytes=options.max_body_bytes,
            priority=options.engine_priority,
        )
        self.relayer = Relayer(options.send_timeout)
        self.forwarder = Forwarder(
            options.upstream,
            metrics,
            self.relayer.relay,
            first_byte_timeout=options.first_byte_timeout,
            read_timeout=options.read_timeout,
        )
        self.forwarder.upstream = upstream
        self.budget = ByteBudget(options.max_held_bytes or None)
        """Bytes of the agent steps' bodies held now (:mod:`concur._budget`)."""
        self.in_flight = 0
        self._request_id = RequestIds()

    @property
    def upstream(self) -> Upstream | None:
        """The upstream client; may be set after construction, before the first request."""
        return self.forwarder.upstream

    @upstream.setter
    def upstream(self, client: Upstream | None) -> None:
        self.forwarder.upstream = client

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = self._request_id()
        self.in_flight += 1
        budget = self.budget
        held = 0  # bytes counted in the budget for this request
        try:
            inspector, forward = self.inspector, self.forwarder.forward
            path = inspector.step_path(request)
            over = False  # its body did not fit in the budget
            if request.body_exists:
                length = request.content_length
                if path is not None and length is not None and length <= inspector.max_body_bytes:
                    over = not budget.fits(length)
                    if over:
                        new, named = self._new_agent_unread(request)
                        if new:
                            return refusal(budget.refuse(length), named, rid, self.metrics)
                    budget.take(length)
                    held = length
                try:
                    body = await inspector.read_body(request)
                except BodyTooLarge:
                    return inspector.too_large(rid)
                if path is not None and length is None:  # chunked: counted once read
                    over = not budget.fits(len(body))
                    budget.take(len(body))
                    held = len(body)
            else:
                body = b""
            if path is None:
                return await forward(request, rid, body, None, Step())
            try:
                step, body = inspector.inspect(request, path, body, rid)
            except IdentityError as exc:
                return inspector.bad_identity(exc, rid)
            agent_id = step.agent_id
            if agent_id is None:
                self.metrics.on_admission("bypassed")
                return await forward(request, rid, body, None, step)
            if over and new_agent(self.gate, agent_id):
                return refusal(budget.refuse(held), agent_id, rid, self.metrics)
            try:
                async with Permit(
                    self.gate, agent_id, context_tokens=step.context_tokens, done=step.done
                ) as ticket:
                    if step.prioritize and ticket.agent is not None:
                        body = _priority.stamp(body, _priority.of(ticket.agent))
                    return await forward(request, rid, body, ticket, step)
            except AdmissionError as exc:
                return refusal(exc, agent_id, rid, self.metrics)
        finally:
            budget.give(held)
            self.in_flight -= 1

    def _new_agent_unread(self, request: web.Request) -> tuple[bool, str | None]:
        """Whether the request is a new agent's, told before its body is read (its
        headers name an agent not admitted, or it is anonymous and gated as such), and
        the agent its headers name."""
        inspector = self.inspector
        agent_id = header_agent(inspector.identity, request.headers)
        if agent_id is not None:
            return new_agent(self.gate, agent_id), agent_id
        return not inspector.identity.needs_body and inspector.anonymous == "gate", None
