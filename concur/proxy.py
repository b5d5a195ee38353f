"""The request path: admission, forwarding to the one upstream, and streaming relay.

Every request that is not one of concur's own endpoints lands in
:meth:`Proxy.handle` and goes to the configured upstream with its method, path,
query, body and end-to-end headers. Only *agent steps* are gated:

* ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST /v1/responses``
  (:data:`GATED_PATHS`, a trailing slash ignored) pass the admission gate;
* everything else (``GET /v1/models``, ``/tokenize``, embeddings, health checks, ...)
  is forwarded straight through, never queued.

Requests go out through concur's own HTTP/1.1 client (:mod:`concur.upstream`);
responses are relayed chunk by chunk as they arrive (``web.StreamResponse``),
never buffered. When the proxy injected ``stream_options.include_usage`` into a
streaming request, the usage-only chunk this adds is dropped from the relayed
stream (see :class:`concur.usage.SSEUsage`). A client that goes away cancels the
handler; the upstream response is then closed at once and the permit released.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import math
import ssl
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from concur import logs
from concur.admission import (
    AdmissionError,
    AdmissionGate,
    AgentEnded,
    GateClosed,
    QueueFull,
    QueueTimeout,
    Ticket,
)
from concur.config import UpstreamSettings
from concur.deadlines import Deadlines, SendWatch, UpstreamTimer
from concur.identity import DEFAULT_SOURCES, IdentityError, IdentityExtractor
from concur.metrics import ConcurMetrics
from concur.upstream import (
    Framing,
    InvalidRequestHead,
    Upstream,
    UpstreamError,
    UpstreamResponse,
)
from concur.usage import (
    SSEUsage,
    encode_with_include_usage,
    estimate_prompt_tokens,
    inject_include_usage,
    loads,
    usage_from_json,
)

log = logging.getLogger("concur.proxy")

try:  # the socket send queue's size, for the send timeout (Linux, macOS)
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - Windows
    _TIOCOUTQ = None

GATED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
"""POST paths that are agent steps and go through admission."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the proxy recomputes (or that only make sense on the client's hop).
_REQUEST_DROP = frozenset({"host", "content-length", "expect"})
_REQUEST_SKIP = HOP_BY_HOP | _REQUEST_DROP | {"x-forwarded-for"}
# The upstream's Content-Length is never copied: it is set from the parsed length, which
# is only known for a length-framed body (a chunked one may carry a stale one too).
_RESPONSE_SKIP = HOP_BY_HOP | {"content-length"}
_TRUE = frozenset({"1", "true", "yes", "on"})
_MAX_USAGE_BODY = 4 << 20
REQUEST_ID_HEADER = "X-Concur-Request-Id"
_MAX_CACHED_TARGETS = 256
_UPSTREAM_DEFAULTS = UpstreamSettings()  # ProxyOptions' timeouts default to the config's


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """What the proxy needs from the configuration."""

    upstream: str
    connect_timeout: float | None = _UPSTREAM_DEFAULTS.connect_timeout
    first_byte_timeout: float | None = _UPSTREAM_DEFAULTS.first_byte_timeout
    """Seconds until the upstream's response headers (a non-streaming generation's whole run)."""
    read_timeout: float | None = _UPSTREAM_DEFAULTS.read_timeout
    """Seconds of upstream silence allowed between two body chunks."""
    send_timeout: float = 60.0
    """Seconds one write may wait for a client that stopped reading."""
    max_body_bytes: int = 32 << 20
    identity: tuple[str, ...] = DEFAULT_SOURCES
    max_identity_bytes: int = 256
    anonymous: Literal["gate", "bypass"] = "gate"
    done_header: str = "X-Concur-Agent-Done"
    gated_paths: frozenset[str] = field(default=GATED_PATHS)
    ssl_context: ssl.SSLContext | None = None
    """TLS for an https upstream (None: the system's CAs)."""
    framing: Framing = "builtin"
    """The upstream client's response parser (``upstream.framing``)."""


def openai_error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error in OpenAI's shape, which OpenAI clients surface verbatim."""
    body = {"error": {"message": message, "type": type_, "code": code, "param": None}}
    return web.json_response(body, status=status, headers=headers)


def hop_by_hop(headers: Mapping[str, str]) -> set[str]:
    """Lower-case names not to forward: the fixed list plus those named in Connection."""
    getall = getattr(headers, "getall", None)
    values = getall("Connection", ()) if getall else [headers.get("Connection", "")]
    names = set(HOP_BY_HOP)
    for value in values:
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def _skipped(headers: MultiMapping[str], base: frozenset[str]) -> frozenset[str]:
    """``base`` plus the names listed in ``headers``' Connection header (usually none)."""
    values = headers.getall("Connection", ())
    if not values:
        return base
    return base | {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _filtered(headers: MultiMapping[str], skip: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without the names in ``skip`` and without ``Proxy-*``.

    ``skip`` holds lower-case names. Usually no name contains ``proxy-`` at all: then
    the copy and the removals are done by multidict in C (its keys compare without
    case, as ``name.lower()`` does for the ASCII names HTTP allows); otherwise each
    header is checked as in :func:`_filtered_each`, the specification of this one.
    """
    if "proxy-" in ",".join(headers.keys()).lower():
        return _filtered_each(headers, skip)
    out = CIMultiDict(headers)
    for name in headers.keys() & skip:
        out.popall(name, None)
    return out


def _filtered_each(headers: MultiMapping[str], skip: frozenset[str]) -> CIMultiDict[str]:
    """:func:`_filtered`, header by header."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in skip and not low.startswith("proxy-"):
            out.add(name, value)
    return out


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


def _unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes written to a client that it has not taken yet: the transport's buffer plus,
    where the OS tells (``TIOCOUTQ``), the socket's send queue. The kernel's queue can
    hold megabytes and drains as the client reads, while the transport's buffer only
    moves when the kernel makes room in large steps, so both are counted."""
    size = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
    sock = transport.get_extra_info("socket")
    if sock is not None and _TIOCOUTQ is not None:
        with contextlib.suppress(OSError, ValueError):
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    return size


def _is_json(content_type: str) -> bool:
    ct = content_type.lower()
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


def make_upstream(options: ProxyOptions) -> Upstream:
    """The one upstream client: pooled keep-alive connections, bodies relayed as they are.

    Nothing is decoded (compressed bodies go through byte for byte with their
    ``Content-Encoding``), no cookies are kept (one agent's cannot leak to another)
    and no proxy environment variable applies: the upstream is only ever the
    configured one. Idle connections are dropped after 4 s, before uvicorn's (vLLM's)
    5 s keep-alive expires, so a POST is never sent on a connection the engine is
    closing.
    """
    return Upstream(
        options.upstream,
        connect_timeout=options.connect_timeout,
        keepalive=4.0,
        ssl_context=options.ssl_context,
        framing=options.framing,
    )


@dataclass(slots=True)
class _Step:
    """The gate-relevant facts of one request."""

    agent_id: str | None = None
    anonymous: bool = False
    done: bool = False
    context_tokens: int = 0
    strip_usage: bool = False


class _BodyTooLarge(Exception):
    pass


class Proxy:
    """Forwards requests to the upstream, through the admission gate when they are agent steps."""

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
        self.upstream = upstream
        """The upstream client; may be set after construction, before the first request."""
        self.identity = IdentityExtractor(options.identity, options.max_identity_bytes)
        up = URL(options.upstream)
        if up.scheme not in ("http", "https") or not up.host:
            raise ValueError(f"upstream URL {options.upstream!r} must be http(s)://host[:port]")
        self._base = up.raw_path.rstrip("/")
        # Credentials in the upstream URL are sent unless the client sent its own.
        self._auth: str | None = None
        if up.user:
            pair = f"{up.user}:{up.password or ''}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode("ascii")
        self.in_flight = 0
        self._request_id = RequestIds()
        self._targets: dict[str, str] = {}
        self._deadlines: Deadlines | None = None

    async def get_status(self, path: str) -> int:
        """The status of ``GET <base path><path>`` on the upstream (its body is dropped)."""
        upstream = self.upstream
        assert upstream is not None, "Proxy.upstream is not set"
        headers = {"Authorization": self._auth} if self._auth is not None else {}
        resp = await upstream.request("GET", self._base + path, headers)
        try:
            while await resp.read():
                pass
        except BaseException:
            resp.close()
            raise
        resp.release()
        return resp.status

    # --------------------------------------------------------------- entry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = self._request_id()
        self.in_flight += 1
        try:
            length = request.content_length
            if length is not None and length > self.options.max_body_bytes:
                return self._too_large(rid)
            if not request.body_exists:
                body = b""
            elif length is not None:
                # The parser feeds at most Content-Length bytes: read them in one call.
                body = await request.content.read()
            else:
                try:
                    body = await self._read_chunked(request)
                except _BodyTooLarge:
                    return self._too_large(rid)
            path = request.rel_url.path
            if request.method != "POST" or path.rstrip("/") not in self.options.gated_paths:
                return await self._forward(request, rid, body, None, _Step())
            try:
                step, body = self._inspect(request, path.rstrip("/"), body, rid)
            except IdentityError as exc:
                logs.event(log, "request_rejected", request_id=rid, status=400, reason="identity")
                return openai_error(
                    400, str(exc), type_="invalid_request_error", code="invalid_agent_identity"
                )
            if step.agent_id is None:
                self.metrics.on_admission("bypassed")
                return await self._forward(request, rid, body, None, step)
            try:  # gate.acquire(), without a coroutine when the ticket is granted at once
                ticket = self.gate.submit(
                    step.agent_id, context_tokens=step.context_tokens, done=step.done
                )
                if not ticket.granted:
                    ticket = await self.gate.wait(ticket)
            except AdmissionError as exc:
                return self._refuse(exc, step, rid)
            try:  # what gate.permit() does, without a generator-based context manager
                return await self._forward(request, rid, body, ticket, step)
            finally:
                self.gate.finish(ticket)
        finally:
            self.in_flight -= 1

    def _too_large(self, rid: str) -> web.Response:
        logs.event(log, "request_rejected", request_id=rid, status=413, reason="body_too_large")
        resp = openai_error(
            413,
            f"request body is larger than {self.options.max_body_bytes} bytes "
            "(server.max_body_bytes)",
            type_="invalid_request_error",
            code="request_too_large",
        )
        resp.force_close()
        return resp

    # ------------------------------------------------------------ admission

    def _inspect(
        self, request: web.Request, path: str, body: bytes, rid: str
    ) -> tuple[_Step, bytes]:
        """The step's agent, done flag and prompt estimate; the body to send upstream.

        The body is parsed only when it is JSON and an identity source reads it or the
        request may stream (stream_options injection); else the estimate comes from
        its size. Nothing of the parsed body outlives this call: a request held at the
        gate keeps only the bytes it will send.
        """
        headers = request.headers
        parsed: dict[str, Any] | None = None
        if (
            body
            and (self.identity.needs_body or b'"stream"' in body)
            and (
                headers.get("Content-Type") == "application/json" or _is_json(request.content_type)
            )
        ):
            try:
                obj = loads(body)
            except (ValueError, RecursionError):  # RecursionError: nested absurdly deep
                obj = None  # the engine will say what is wrong with it
            if isinstance(obj, dict):
                parsed = obj
        step = _Step()
        found = self.identity.extract(headers, parsed)
        if found is not None:
            step.agent_id = found[0]
        elif self.options.anonymous == "gate":
            step.agent_id = f"anon-{rid}"
            step.anonymous = True
        if step.anonymous:
            step.done = True
        else:
            done = headers.get(self.options.done_header)
            step.done = done is not None and done.strip().lower() in _TRUE
        step.context_tokens = len(body) // 4
        if parsed is None:
            return step, body
        try:
            step.context_tokens = estimate_prompt_tokens(parsed)
            had_options = "stream_options" in parsed
            if step.agent_id is not None and inject_include_usage(path, parsed):
                body = encode_with_include_usage(body, parsed, had_options=had_options)
                step.strip_usage = True
        except RecursionError:  # too deep to walk or re-encode: forward it as it came
            pass
        return step, body

    def _refuse(self, exc: AdmissionError, step: _Step, rid: str) -> web.Response:
        fields: dict[str, Any] = {"request_id": rid, "agent": step.agent_id, "reason": exc.reason}
        if isinstance(exc, QueueFull | QueueTimeout):
            retry = max(1, math.ceil(exc.retry_after or 1.0))
            logs.event(log, "request_rejected", status=429, **fields)
            return openai_error(
                429,
                str(exc),
                type_="rate_limit_error",
                code=exc.reason,
                headers={"Retry-After": str(retry)},
            )
        if isinstance(exc, GateClosed):
            self.metrics.on_admission("closed")
            logs.event(log, "request_rejected", status=503, **fields)
            return openai_error(
                503, str(exc), type_="server_error", code=exc.reason, headers={"Retry-After": "1"}
            )
        if isinstance(exc, AgentEnded):
            logs.event(log, "request_rejected", status=409, **fields)
            return openai_error(409, str(exc), type_="invalid_request_error", code=exc.reason)
        logs.event(log, "request_rejected", status=503, **fields)
        return openai_error(503, str(exc), type_="server_error", code=exc.reason)

    # --------------------------------------------------------------- upstream

    async def _read_chunked(self, request: web.Request) -> bytes:
        """A body without Content-Length, up to ``max_body_bytes``."""
        limit = self.options.max_body_bytes
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise _BodyTooLarge
        return bytes(buf)

    def target(self, request: web.Request) -> str:
        """The upstream request target for ``request``: base path + the raw path and query.

        Only the path and query come from the client (an absolute-form request
        target's host is ignored); the origin is always the configured one, so no
        request can point the proxy elsewhere.
        """
        # A function of the request target alone, and agents send the same few: cached.
        raw_target = request.raw_path
        target = self._targets.get(raw_target)
        if target is None:
            rel = request.rel_url
            path = rel.raw_path if rel.raw_path.startswith("/") else "/" + rel.raw_path
            query = rel.raw_query_string
            target = self._base + path + ("?" + query if query else "")
            if len(self._targets) >= _MAX_CACHED_TARGETS:
                self._targets.clear()
            self._targets[raw_target] = target
        return target

    def upstream_headers(self, request: web.Request, step: _Step) -> CIMultiDict[str]:
        out = _filtered(request.headers, _skipped(request.headers, _REQUEST_SKIP))
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        remote = request.remote or "unknown"
        out["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
        if self._auth is not None and "Authorization" not in out:
            out["Authorization"] = self._auth
        if step.strip_usage:
            # The usage chunk must be found (and dropped) in plain text.
            out["Accept-Encoding"] = "identity"
        return out

    async def _forward(
        self,
        request: web.Request,
        rid: str,
        body: bytes,
        ticket: Ticket | None,
        step: _Step,
    ) -> web.StreamResponse:
        opts = self.options
        upstream = self.upstream
        assert upstream is not None, "Proxy.upstream is not set"
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = Deadlines(loop)
        timer = UpstreamTimer(deadlines, opts.first_byte_timeout, opts.read_timeout)
        try:
            up = await upstream.request(
                request.method,
                self.target(request),
                self.upstream_headers(request, step),
                body if body or request.body_exists else None,
            )
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if timer.failed(cancelled):
                return self._upstream_failed(rid, step, 504, "timeout", started)
            if isinstance(exc, TimeoutError):  # no connection in time
                return self._upstream_failed(rid, step, 504, "timeout", started, exc)
            if isinstance(exc, UpstreamError):
                return self._upstream_failed(rid, step, 502, "error", started, exc)
            if isinstance(exc, InvalidRequestHead):
                logs.event(log, "request_rejected", request_id=rid, status=400, reason="header")
                return openai_error(400, str(exc), type_="invalid_request_error", code="bad_header")
            if cancelled:
                self.metrics.on_upstream("cancelled", None)
            raise
        timer.responded(up)
        self.metrics.on_upstream(str(up.status), loop.time() - started)
        complete = False
        try:
            resp, complete = await self._relay(request, rid, up, ticket, step)
            return resp
        finally:
            timer.cancel()
            if complete:
                up.release()
            else:
                up.close()  # drop the connection: the upstream sees the abort at once

    def _upstream_failed(
        self,
        rid: str,
        step: _Step,
        status: int,
        code: str,
        started: float,
        exc: BaseException | None = None,
    ) -> web.Response:
        self.metrics.on_upstream(code, None)
        waited = asyncio.get_running_loop().time() - started
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        logs.event(
            log,
            "upstream_failed",
            logging.WARNING,
            request_id=rid,
            agent=step.agent_id,
            status=status,
            after=round(waited, 3),
            error=detail or code,
        )
        if status == 504:
            message = (
                f"the upstream engine did not answer within {self.options.first_byte_timeout}s "
                "(upstream.first_byte_timeout)"
                if exc is None
                else str(exc)
            )
            return openai_error(504, message, type_="upstream_error", code="upstream_timeout")
        message = f"the upstream engine is unreachable or failed ({detail or code}); retry later"
        return openai_error(502, message, type_="upstream_error", code="upstream_unavailable")

    def _send_watch(self, request: web.Request, rid: str, step: _Step) -> SendWatch:
        """Close the client's connection when it reads nothing for ``send_timeout`` s
        while a write to it waits."""
        limit = self.options.send_timeout
        deadlines = self._deadlines
        assert deadlines is not None

        def stuck() -> None:
            logs.event(
                log,
                "client_stalled",
                logging.WARNING,
                request_id=rid,
                agent=step.agent_id,
                error=f"the client read nothing for {limit:g}s (server.send_timeout); closed",
            )
            if request.transport is not None:
                request.transport.abort()

        transport = request.transport

        def unsent() -> int:
            return _unsent_bytes(transport) if transport is not None else 0

        return SendWatch(deadlines, limit, stuck, unsent)

    async def _relay(
        self,
        request: web.Request,
        rid: str,
        up: UpstreamResponse,
        ticket: Ticket | None,
        step: _Step,
    ) -> tuple[web.StreamResponse, bool]:
        """Relay the upstream response; returns it and whether the upstream body was read whole."""
        content_type = up.headers.get("Content-Type", "").lower()
        sse = content_type.startswith("text/event-stream")
        accounting = ticket is not None and 200 <= up.status < 300
        encoded = up.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
        tracker: SSEUsage | None = None
        json_buf: bytearray | None = None
        if accounting and not encoded:
            if sse:
                tracker = SSEUsage(strip_usage_chunk=step.strip_usage)
            elif "json" in content_type:
                json_buf = bytearray()

        headers = _filtered(up.headers, _skipped(up.headers, _RESPONSE_SKIP))
        headers[REQUEST_ID_HEADER] = rid
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if up.length is not None and (tracker is None or not tracker.strip):
            resp.content_length = up.length
        failure: BaseException | None = None
        read = up.read
        watch = self._send_watch(request, rid, step)
        try:
            await resp.prepare(request)
            while True:
                try:
                    chunk = await read()
                except (TimeoutError, UpstreamError) as exc:
                    failure = exc
                    break
                if not chunk:
                    break
                if json_buf is not None:
                    json_buf += chunk
                    if len(json_buf) > _MAX_USAGE_BODY:
                        json_buf = None
                out = tracker.feed(chunk) if tracker is not None else chunk
                if out:
                    watch.writes += 1
                    watch.writing = True
                    await resp.write(out)
                    watch.writing = False
            if failure is None:
                watch.writes += 1
                watch.writing = True
                if tracker is not None:
                    rest = tracker.flush()
                    if rest:
                        await resp.write(rest)
                await resp.write_eof()
        except ConnectionResetError:
            # The client went away (without handler cancellation): nothing left to do.
            logs.event(log, "client_gone", logging.DEBUG, request_id=rid, agent=step.agent_id)
            return resp, False
        finally:
            watch.cancel()
        if failure is not None:
            # Headers are out: the only honest signal left is a truncated response.
            logs.event(
                log,
                "upstream_aborted",
                logging.WARNING,
                request_id=rid,
                agent=step.agent_id,
                error=f"{type(failure).__name__}: {failure}".rstrip(": "),
            )
            if request.transport is not None:
                request.transport.close()
            return resp, False
        if ticket is not None:
            tokens = tracker.tokens if tracker is not None else None
            if json_buf is not None:
                tokens = usage_from_json(bytes(json_buf))
            if tokens is not None:
                ticket.usage_tokens = tokens
        if log.isEnabledFor(logging.DEBUG):
            logs.event(
                log,
                "request",
                logging.DEBUG,
                request_id=rid,
                agent=step.agent_id,
                method=request.method,
                path=request.rel_url.path,
                status=up.status,
                usage=ticket.usage_tokens if ticket is not None else None,
            )
        return resp, True
