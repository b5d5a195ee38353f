"""concur's HTTP/1.1 client for its one upstream engine.

The proxy sends every request to one origin and relays each response body as
it arrives. aiohttp's client does that through layers made for general use: a
request object with cookie, auth, proxy and payload hooks, and a body
``StreamReader`` that runs about a dozen Python calls per body chunk (HTTP-chunk
bookkeeping, flow control, timers). On a proxy relaying a token stream, one
chunk per token, those layers cost more CPU than all of concur's own work
(README, "Proxy overhead"). This module does the one job directly on asyncio:

* keep-alive connections to the one origin, reused newest first and dropped
  after ``keepalive`` idle seconds, or sooner when the engine's ``Keep-Alive:
  timeout=N`` says it closes them sooner (before the engine's own keep-alive
  expires); an idle connection with anything to read (the engine's FIN or reset, not
  yet handled) is dropped rather than written to;
* at most ``max_connections`` of them open: past that a request waits for one to be
  released (bounded by the caller's own deadline), as Envoy's circuit breaker bounds
  its connection pool;
* a request that finds its reused connection closed before any byte of it was sent
  (the keep-alive race) is sent once more on a fresh connection, whatever its
  method; one already (partly) sent is repeated only if its method is idempotent
  (:data:`IDEMPOTENT`), and never once response bytes arrived;
* the request written in one piece (head and body: concur has read the body);
* the response read by a framer (``framing``, :mod:`concur._framing`: concur's
  own parser, llhttp through httptools, or aiohttp's C parser): status line,
  headers (64 KiB at most), then a ``Content-Length``, ``chunked`` or
  close-delimited body (RFC 9112, section 6), de-chunked and handed to the one
  reader as it arrives, with reading paused while more than 256 KiB wait unread.

Anything the framer does not accept whole (an obsolete line fold, a header name
with spaces, conflicting lengths, a transfer coding other than ``chunked``) is
an :class:`UpstreamProtocolError`: the proxy answers 502 (or truncates a body
already under way) rather than guess at the framing.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any

from yarl import URL

from concur._framing import FRAMINGS, Framing, framer_factory
from concur._upstream_connection import HIGH_WATER, UpstreamResponse, _Connection
from concur._upstream_errors import (
    InvalidRequestHead,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
)

__all__ = [
    "FRAMINGS",
    "HIGH_WATER",
    "IDEMPOTENT",
    "Framing",
    "InvalidRequestHead",
    "Upstream",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "keepalive_margin",
    "keepalive_timeout",
]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods retried once when a reused connection turns out closed before any answer
(any method is, when not a byte of it was sent)."""
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


def keepalive_timeout(header: str) -> float | None:
    """The ``timeout`` of a ``Keep-Alive`` response header (``timeout=5, max=100``),
    in seconds; None when it has none that is a number >= 0."""
    for part in header.split(","):
        name, eq, value = part.partition("=")
        if eq and name.strip().lower() == "timeout":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


def keepalive_margin(engine_timeout: float) -> float:
    """How long concur keeps a connection idle when the engine says it keeps it
    ``engine_timeout`` seconds: a second less (half of it, under two seconds), so
    concur drops it first."""
    return max(engine_timeout - 1.0, engine_timeout / 2)


class Upstream:
    """Pooled HTTP/1.1 connections to one origin (``http://`` or ``https://``), their
    responses read by the ``framing`` parser (see :mod:`concur._framing`)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float | None = 5.0,
        keepalive: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
        framing: Framing = "builtin",
        max_connections: int | None = None,
    ) -> None:
        origin = URL(url)
        if origin.scheme not in ("http", "https") or not origin.raw_host:
            raise ValueError(f"upstream URL {url!r} must be http(s)://host[:port]")
        self.host = origin.raw_host
        port = origin.port
        assert port is not None
        self.port = port
        self.origin = f"{origin.scheme}://{origin.raw_host}:{port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if origin.is_default_port() else f"{host}:{port}"
        self.connect_timeout = connect_timeout
        self.keepalive_limit = keepalive
        """The configured idle limit (``upstream.keepalive``)."""
        self.keepalive = keepalive
        """Seconds a connection may stay idle: ``keepalive_limit``, or less if the engine's
        ``Keep-Alive`` header says so."""
        self.engine_timeout: float | None = None
        """The engine's own keep-alive (its ``Keep-Alive: timeout``), once it said it."""
        self._keepalive_header: str | None = None
        self.max_connections = max_connections
        """Cap on open connections (None: none)."""
        self.open = 0
        """Connections open or being opened."""
        self.retries = 0
        """Requests sent again on a fresh connection."""
        self.discarded = 0
        """Idle connections found closed by the engine when about to be used."""
        self.waits = 0
        """Requests that waited for a connection (``max_connections`` reached)."""
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        """Requests waiting for a connection: handed one released, or None (a slot to
        open one in, already counted in ``open``)."""
        self.framer = framer_factory(framing)
        """Makes each connection's framer (:mod:`concur._framing`)."""
        self._ssl: ssl.SSLContext | None = None
        if origin.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._idle: list[_Connection] = []
        """Connections waiting for a request, the most recently used last."""
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def head(
        self, method: str, target: str, headers: Mapping[str, str], length: int | None
    ) -> bytes:
        """The request head: ``target`` is the raw (percent-encoded) path and query."""
        lines = [f"{method} {target} HTTP/1.1\r\n", f"Host: {self.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise InvalidRequestHead("a request header, the method or the target contains CR or LF")
        return text.encode("utf-8", "surrogateescape")

    async def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request; the response once its headers arrived.

        ``Content-Length`` is sent for a body, and as 0 for a method that defines
        one (POST, PUT, PATCH, DELETE) sent without. Raises
        :class:`UpstreamError` (a 502) or :class:`UpstreamConnectTimeout` (a 504).
        """
        if self._closed:
            raise UpstreamConnectError("the upstream client is closed")
        if body is None and method not in _BODYLESS_METHODS:
            body = b""
        head = self.head(method, target, headers, None if body is None else len(body))
        retried = False
        while True:
            conn = None if retried else self._take()
            if conn is None:
                conn = await self._obtain()
            try:
                return await conn.exchange(head, body, method)
            except UpstreamDisconnected as exc:
                # The keep-alive race: the engine closed an idle connection as the
                # request went out. Sent again, once, on a fresh connection: any
                # request none of which was sent, else one safe to repeat.
                if retried or not conn.reused:
                    raise
                if not (exc.unsent or (exc.before_response and method in IDEMPOTENT)):
                    raise
                retried = True
                self.retries += 1

    @property
    def idle(self) -> int:
        """Idle connections in the pool (some may have been closed by the engine since)."""
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection now."""
        return sum(1 for w in self._waiters if not w.done())

    def engine_keepalive(self, header: str) -> None:
        """A response's ``Keep-Alive`` header: idle connections are dropped before the
        engine's ``timeout`` (see :func:`keepalive_margin`), never later than
        ``keepalive_limit``."""
        if header == self._keepalive_header:
            return
        self._keepalive_header = header
        seconds = keepalive_timeout(header)
        if seconds is None:
            return
        self.engine_timeout = seconds
        self.keepalive = min(self.keepalive_limit, keepalive_margin(seconds))

    def put(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.reused = True
        conn.idle_since = conn.clock()
        waiters = self._waiters
        while waiters:  # a request waiting for a connection takes it at once
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self.keepalive, self._expire)

    async def close(self) -> None:
        """Close the idle connections; refuse new requests."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("the upstream client is closed"))

    # ------------------------------------------------------------ internals

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not self._stale(conn, conn.clock()):
                if not conn.peer_closed():
                    return conn
                self.discarded += 1
            conn.abort()
        return None

    async def _obtain(self) -> _Connection:
        """A new connection, or past ``max_connections`` the first one released (or a
        new one as soon as one closes), in the order the requests came."""
        cap = self.max_connections
        if cap is None or self.open < cap:
            self.open += 1
            return await self._connect()
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.waits += 1
        try:
            conn = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()  # handed over as this request gave up: pass it on
                if given is None:
                    self._left()
                else:
                    self.put(given)
            raise
        if conn is None:  # a slot, counted for this request already
            return await self._connect()
        return conn

    def _left(self) -> None:
        """One connection closed (or failed to open): its slot goes to the first waiter."""
        self.open -= 1
        cap = self.max_connections
        waiters = self._waiters
        while waiters and (cap is None or self.open < cap):
            waiter = waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)

    def _stale(self, conn: _Connection, now: float) -> bool:
        """Not to be used again: closed (or closing), or idle ``keepalive`` seconds."""
        return conn.closed or now - conn.idle_since >= self.keepalive

    def _expire(self) -> None:
        """Close connections idle for ``keepalive`` seconds (the oldest are first)."""
        self._sweep = None
        idle = self._idle
        if not idle:
            return
        now = idle[0].clock()
        stale = 0
        while stale < len(idle) and self._stale(idle[stale], now):
            idle[stale].abort()
            stale += 1
        del idle[:stale]
        if idle:
            wait = idle[0].idle_since + self.keepalive - now
            self._sweep = idle[0].loop.call_later(max(wait, 0.01), self._expire)

    async def _connect(self) -> _Connection:
        """A new connection, in a slot already counted in ``open``."""
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self._ssl is not None:
            kwargs = {"ssl": self._ssl, "server_hostname": self.host}
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop), self.host, self.port, **kwargs
                )
        except TimeoutError:
            self._left()
            raise UpstreamConnectTimeout(
                f"no connection to {self.origin} within {self.connect_timeout:g}s "
                "(upstream.connect_timeout)"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            self._left()
            raise UpstreamConnectError(f"cannot connect to {self.origin}: {exc}") from exc
        except BaseException:
            self._left()
            raise
        conn.counted = True
        if conn.closed:  # lost before it was handed over
            conn.abort()
        return conn
