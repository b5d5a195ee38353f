"""Forward: the third layer of the request path (inspect, admit, forward, relay).

The request goes to the one configured upstream through concur's own HTTP/1.1
client (:mod:`concur.upstream`), with its method, the base path plus its raw path
and query, its end-to-end headers and its body, under the upstream timeouts
(:class:`~concur.deadlines.UpstreamTimer`, on the shared :class:`~concur.deadlines.Deadlines`
heap). A failure before the response headers is answered here (502, 504, 400); with
the headers in, the response goes to the relay, and the upstream connection is
released for reuse when the relay read the body whole, else closed (the engine then
sees the abort at once).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from concur import logs
from concur._errors import openai_error
from concur._headers import REQUEST_SKIP, filtered, skipped
from concur._inspect import Step
from concur.admission import Ticket
from concur.deadlines import Deadlines, UpstreamTimer
from concur.metrics import ConcurMetrics
from concur.upstream import (
    Framing,
    InvalidRequestHead,
    Upstream,
    UpstreamError,
    UpstreamResponse,
)

log = logging.getLogger("concur.proxy")

_MAX_CACHED_TARGETS = 256

Relay = Callable[
    [web.Request, str, UpstreamResponse, Ticket | None, Step, Deadlines],
    Awaitable[tuple[web.StreamResponse, bool]],
]
"""The next layer: relays the upstream response; returns it and whether the upstream
body was read whole."""


def make_upstream(
    url: str,
    connect_timeout: float | None,
    ssl_context: ssl.SSLContext | None,
    framing: Framing = "builtin",
    *,
    keepalive: float = 4.0,
    max_connections: int | None = 1024,
) -> Upstream:
    """The one upstream client: pooled keep-alive connections, bodies relayed as they are.

    Nothing is decoded (compressed bodies go through byte for byte with their
    ``Content-Encoding``), no cookies are kept (one agent's cannot leak to another)
    and no proxy environment variable applies: the upstream is only ever the
    configured one. Idle connections are dropped after ``keepalive`` seconds
    (``upstream.keepalive``, 4 s: before uvicorn's, vLLM's, 5 s keep-alive expires), or
    sooner when the engine's ``Keep-Alive: timeout`` header says so; at most
    ``max_connections`` are open (``upstream.max_connections``).
    """
    return Upstream(
        url,
        connect_timeout=connect_timeout,
        keepalive=keepalive,
        ssl_context=ssl_context,
        framing=framing,
        max_connections=max_connections,
    )


class Forwarder:
    """Sends requests upstream and hands their responses to the relay."""

    def __init__(
        self,
        upstream_url: str,
        metrics: ConcurMetrics,
        relay: Relay,
        *,
        first_byte_timeout: float | None,
        read_timeout: float | None,
    ) -> None:
        up = URL(upstream_url)
        if up.scheme not in ("http", "https") or not up.host:
            raise ValueError(f"upstream URL {upstream_url!r} must be http(s)://host[:port]")
        self.metrics = metrics
        self.relay = relay
        self.first_byte_timeout = first_byte_timeout
        self.read_timeout = read_timeout
        self.upstream: Upstream | None = None
        """The upstream client; may be set after construction, before the first request."""
        self._base = up.raw_path.rstrip("/")
        # Credentials in the upstream URL are sent unless the client sent its own.
        self._auth: str | None = None
        if up.user:
            pair = f"{up.user}:{up.password or ''}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode("ascii")
        self._targets: dict[str, str] = {}
        self._deadlines: Deadlines | None = None

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

    def headers(self, request: web.Request, step: Step) -> CIMultiDict[str]:
        """The request's end-to-end headers, with X-Forwarded-For and the upstream's
        credentials (unless the client sent its own)."""
        out = filtered(request.headers, skipped(request.headers, REQUEST_SKIP))
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        remote = request.remote or "unknown"
        out["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
        if self._auth is not None and "Authorization" not in out:
            out["Authorization"] = self._auth
        if step.strip_usage:
            # The usage chunk must be found (and dropped) in plain text.
            out["Accept-Encoding"] = "identity"
        return out

    async def get_status(self, path: str) -> int:
        """The status of ``GET <base path><path>`` on the upstream (its body is dropped)."""
        upstream = self.upstream
        assert upstream is not None, "the upstream client is not set"
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

    async def forward(
        self, request: web.Request, rid: str, body: bytes, ticket: Ticket | None, step: Step
    ) -> web.StreamResponse:
        upstream = self.upstream
        assert upstream is not None, "the upstream client is not set"
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = Deadlines(loop)
        timer = UpstreamTimer(deadlines, self.first_byte_timeout, self.read_timeout)
        try:
            up = await upstream.request(
                request.method,
                self.target(request),
                self.headers(request, step),
                body if body or request.body_exists else None,
            )
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if timer.failed(cancelled):
                return self._failed(rid, step, 504, "timeout", started)
            if isinstance(exc, TimeoutError):  # no connection in time
                return self._failed(rid, step, 504, "timeout", started, exc)
            if isinstance(exc, UpstreamError):
                return self._failed(rid, step, 502, "error", started, exc)
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
            resp, complete = await self.relay(request, rid, up, ticket, step, deadlines)
            return resp
        finally:
            timer.cancel()
            if complete:
                up.release()
            else:
                up.close()  # drop the connection: the upstream sees the abort at once

    def _failed(
        self,
        rid: str,
        step: Step,
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
                f"the upstream engine did not answer within {self.first_byte_timeout}s "
                "(upstream.first_byte_timeout)"
                if exc is None
                else str(exc)
            )
            return openai_error(504, message, type_="upstream_error", code="upstream_timeout")
        message = f"the upstream engine is unreachable or failed ({detail or code}); retry later"
        return openai_error(502, message, type_="upstream_error", code="upstream_unavailable")
