"""concur's HTTP/1.1 client for its one upstream engine.

The proxy sends every request to one origin and relays each response body as
it arrives. aiohttp's client does that through layers made for general use: a
request object with cookie, auth, proxy and payload hooks, and a body
``StreamReader`` that runs about a dozen Python calls per body chunk (HTTP-chunk
bookkeeping, flow control, timers). On a proxy relaying a token stream, one
chunk per token, those layers cost more CPU than all of concur's own work
(README, "Proxy overhead"). This module does the one job directly on asyncio:

* keep-alive connections to the one origin, reused newest first and dropped
  after ``keepalive`` idle seconds (before the engine's own keep-alive expires);
* the request written in one piece (head and body: concur has read the body);
* the response read by a small, strict HTTP/1.1 parser: status line, headers
  (64 KiB at most), then a ``Content-Length``, ``chunked`` or close-delimited
  body (RFC 9112, section 6), de-chunked and handed to the one reader as it
  arrives, with reading paused while more than 256 KiB wait unread.

Anything the parser does not accept whole (an obsolete line fold, a header name
with spaces, conflicting lengths, a transfer coding other than ``chunked``) is
an :class:`UpstreamProtocolError`: the proxy answers 502 (or truncates a body
already under way) rather than guess at the framing.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from multidict import CIMultiDict
from yarl import URL

MAX_HEAD_BYTES = 64 << 10
"""The largest response head (status line and headers) accepted."""
MAX_CHUNK_LINE = 4096
"""The longest chunk-size line (size and extensions) accepted."""
HIGH_WATER = 256 << 10
"""Unread body bytes at which reading from the upstream pauses."""
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods retried once when a reused connection turns out closed before any answer."""
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX = b"0123456789abcdefABCDEF"

# What the connection is reading (``_Connection._mode``).
_IDLE = 0  # no exchange: bytes now are a protocol error
_HEAD = 1  # the status line and headers
_LENGTH = 2  # a body of ``_left`` more bytes
_CHUNKED = 3  # a chunked body (``_left``: > 0 data bytes, 0 a size line, -1 a CRLF)
_TRAILERS = 4  # the trailer section after the last chunk
_UNTIL_CLOSE = 5  # a body that ends when the connection does


class UpstreamError(Exception):
    """The upstream could not be reached, or broke HTTP: the proxy answers 502."""


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream."""


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    """No connection within ``upstream.connect_timeout``: the proxy answers 504."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before its response ended."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class UpstreamProtocolError(UpstreamError):
    """The upstream's response is not HTTP/1.1 this client accepts."""


class InvalidRequestHead(ValueError):
    """A header, the method or the target would break the request's framing (CR or LF)."""


def _clock_of(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, or the C function it returns for the standard event loop."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


class UpstreamResponse:
    """One response: status and headers now, the body by :meth:`read` as it arrives.

    End it with :meth:`release` once :meth:`read` returned ``b""`` (the
    connection goes back to the pool when it can carry another request), or with
    :meth:`close` at any time (the connection is dropped, which the upstream sees
    as the client going away).
    """

    __slots__ = (
        "_clock",
        "_conn",
        "_data",
        "_eof",
        "_exc",
        "_loop",
        "_size",
        "_waiter",
        "headers",
        "length",
        "reason",
        "since",
        "status",
        "version",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self._loop = conn.loop
        self._clock = conn.clock
        self.status = 0
        self.reason = ""
        self.version = (1, 1)
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.length: int | None = None
        """The body's length when ``Content-Length`` framed it (for a HEAD response, the
        length it declares); None for a chunked or close-delimited body."""
        self._data: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.since: float | None = None
        """When the pending :meth:`read` began waiting for the upstream (None: not waiting)."""

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); ``b""`` at
        the end. Raises what ended the body otherwise (:class:`UpstreamError`, or what
        :meth:`set_exception` was given)."""
        while not self._data:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            waiter = self._waiter = self._loop.create_future()
            self.since = self._clock()
            try:
                await waiter
            finally:
                self._waiter = None
                self.since = None
        data = self._data
        out = data[0] if len(data) == 1 else b"".join(data)
        data.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return out

    @property
    def complete(self) -> bool:
        """The whole body has arrived (what is left of it may still be unread)."""
        return self._eof

    def set_exception(self, exc: BaseException) -> None:
        """End the body with ``exc``: the pending or next :meth:`read` raises it."""
        if self._exc is None and not self._eof:
            self._exc = exc
            self._wake()

    def release(self) -> None:
        """Done with a response read to its end: its connection may serve another request."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(self._eof and not self._data)

    def close(self) -> None:
        """Done with it, read or not: drop the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    # ------------------------------------------------- fed by the connection

    def _feed(self, piece: bytes) -> None:
        self._data.append(piece)
        self._size += len(piece)
        if self._waiter is not None:
            self._wake()

    def _end(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One connection to the upstream and the parser of the response it is reading."""

    __slots__ = (
        "_head",
        "_head_request",
        "_head_waiter",
        "_keep_alive",
        "_left",
        "_line",
        "_mode",
        "_resp",
        "clock",
        "closed",
        "idle_since",
        "loop",
        "paused",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, pool: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.clock = _clock_of(loop)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.reused = False
        self.idle_since = 0.0
        self._mode = _IDLE
        self._resp: UpstreamResponse | None = None
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._head_request = False
        self._head = bytearray()
        self._line = b""
        self._left = 0
        self._keep_alive = False

    # ------------------------------------------------------------ exchange

    async def exchange(self, head: bytes, body: bytes | None, method: str) -> UpstreamResponse:
        """Send one request; its response once the headers are in."""
        transport = self.transport
        assert transport is not None and self._mode == _IDLE
        self._resp = UpstreamResponse(self)
        self._mode = _HEAD
        self._head_request = method == "HEAD"
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._head_waiter = waiter
        if not body:
            transport.write(head)
        elif len(body) < 1 << 16:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        try:
            return await waiter
        except BaseException:
            self.abort()
            raise
        finally:
            self._head_waiter = None

    def done(self, whole: bool) -> None:
        """The response was released: back to the pool, or closed if it cannot be reused."""
        self._resp = None
        if whole and self._keep_alive and self._mode == _IDLE and not self.closed:
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self._mode = _IDLE
        if self.transport is not None:
            self.transport.abort()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        mode = self._mode
        self._mode = _IDLE
        if mode == _UNTIL_CLOSE and exc is None:  # a clean close is this body's end
            if self._resp is not None:
                self._resp._end()
        elif mode != _IDLE:
            before = mode == _HEAD and not self._head
            why = f" ({exc})" if exc is not None else ""
            what = "before answering" if before else "before its response ended"
            self._fail(
                UpstreamDisconnected(
                    f"the upstream closed the connection {what}{why}", before_response=before
                )
            )

    def data_received(self, data: bytes) -> None:
        mode = self._mode
        if mode == _CHUNKED:
            self._chunked(data)
        elif mode == _LENGTH:
            self._length(data)
        elif mode == _HEAD:
            self._head_data(data)
        elif mode == _UNTIL_CLOSE:
            self._deliver(data)
        elif mode == _TRAILERS:
            self._trailers(self._line + data)
        else:
            self._broken(UpstreamProtocolError("the upstream sent data nobody asked for"))

    def eof_received(self) -> bool | None:
        self.closed = True  # never handed out again, even before connection_lost runs
        return None  # close the transport: connection_lost ends or fails the exchange

    # ------------------------------------------------------------- parsing

    def _deliver(self, piece: bytes) -> None:
        resp = self._resp
        assert resp is not None
        resp._feed(piece)
        if resp._size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _end_body(self, rest: bytes) -> None:
        self._mode = _IDLE
        if rest:  # more than the response framed: never reuse this connection
            self._keep_alive = False
        assert self._resp is not None
        self._resp._end()

    def _broken(self, exc: UpstreamError) -> None:
        self._fail(exc)
        self.abort()

    def _fail(self, exc: UpstreamError) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._resp is not None:
            self._resp.set_exception(exc)

    def _head_data(self, data: bytes) -> None:
        head = self._head
        if head:
            head += data
            data = bytes(head)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                self._broken(UpstreamProtocolError("the upstream's response headers exceed 64 KiB"))
            elif not head:
                head += data
            return
        head.clear()
        if end > MAX_HEAD_BYTES:
            self._broken(UpstreamProtocolError("the upstream's response headers exceed 64 KiB"))
            return
        resp = self._resp
        assert resp is not None
        try:
            interim = self._parse_head(resp, data[:end])
        except UpstreamProtocolError as exc:
            self._broken(exc)
            return
        rest = data[end + 4 :]
        if interim:  # 1xx: the real response follows
            resp.headers = CIMultiDict()
            if rest:
                self._head_data(rest)
            return
        waiter = self._head_waiter
        if waiter is None or waiter.done():  # the requester gave up meanwhile
            self.abort()
            return
        waiter.set_result(resp)
        if self._mode == _IDLE:
            self._end_body(rest)
        elif rest:
            self.data_received(rest)

    def _parse_head(self, resp: UpstreamResponse, block: bytes) -> bool:
        """Fill ``resp`` from the head; set the body framing. True for an interim 1xx."""
        lines = block.split(b"\r\n")
        n = len(lines) - 1
        if block.count(b"\n") != n or block.count(b"\r") != n or b"\x00" in block:
            raise UpstreamProtocolError("the upstream's response head has a bare CR, LF or NUL")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version == b"HTTP/1.1":
            resp.version = (1, 1)
        elif version == b"HTTP/1.0":
            resp.version = (1, 0)
        else:
            raise UpstreamProtocolError(f"the upstream answered {lines[0][:64]!r}, not HTTP/1.x")
        if len(code) != 3 or not code.isdigit():
            raise UpstreamProtocolError(f"the upstream answered status {code[:16]!r}")
        status = int(code)
        headers = resp.headers
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name.translate(None, _TOKEN):
                raise UpstreamProtocolError(
                    f"the upstream sent a malformed header line {line[:64]!r}"
                )
            headers.add(
                name.decode("ascii"), value.strip(b" \t").decode("utf-8", "surrogateescape")
            )
        resp.status = status
        resp.reason = reason.decode("latin-1")
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamProtocolError("the upstream switched protocols (101), unsupported")
            return True
        connection = headers.get("Connection")
        tokens = connection.lower() if connection is not None else ""
        if len(headers.getall("Connection", ())) > 1:
            tokens = ",".join(headers.getall("Connection")).lower()
        if resp.version == (1, 1):
            self._keep_alive = "close" not in tokens
        else:
            self._keep_alive = "keep-alive" in tokens
        lengths = headers.getall("Content-Length", ())
        declared = _content_length(lengths)
        if self._head_request or status in (204, 304):
            resp.length = declared if self._head_request else None
            self._mode = _IDLE
            return False
        coding = headers.getall("Transfer-Encoding", ())
        if coding:
            codings = [c.strip().lower() for v in coding for c in v.split(",")]
            if codings != ["chunked"]:
                raise UpstreamProtocolError(
                    f"the upstream used Transfer-Encoding {', '.join(codings)!r}; "
                    "only 'chunked' is supported"
                )
            if "Content-Length" in headers:
                self._keep_alive = False  # RFC 9112 6.3: a message to close after
            self._mode = _CHUNKED
            self._left = 0
            self._line = b""
            return False
        if lengths:
            if declared is None:
                raise UpstreamProtocolError(
                    f"the upstream sent an invalid Content-Length {', '.join(lengths)!r}"
                )
            resp.length = self._left = declared
            self._mode = _LENGTH if declared else _IDLE
            return False
        self._mode = _UNTIL_CLOSE
        self._keep_alive = False
        return False

    def _length(self, data: bytes) -> None:
        left = self._left
        n = len(data)
        if n < left:
            self._left = left - n
            self._deliver(data)
            return
        self._left = 0
        self._deliver(data if n == left else data[:left])
        self._end_body(data[left:])

    def _chunked(self, data: bytes) -> None:
        """De-chunk ``data``; ``_left`` carries the state (see ``_CHUNKED``)."""
        if self._line:
            data = self._line + data
            self._line = b""
        pos = 0
        end = len(data)
        left = self._left
        try:
            while pos < end:
                if left > 0:  # inside a chunk's data
                    stop = pos + left
                    if stop <= end:
                        self._deliver(data[pos:stop] if pos or stop < end else data)
                        pos = stop
                        left = -1
                    else:
                        self._deliver(data[pos:] if pos else data)
                        left = stop - end
                        pos = end
                elif left == -1:  # the CRLF closing a chunk's data
                    if end - pos < 2:
                        self._line = data[pos:]
                        break
                    if data[pos] != 13 or data[pos + 1] != 10:
                        raise UpstreamProtocolError("the upstream's chunk data overruns its size")
                    pos += 2
                    left = 0
                else:  # a chunk-size line
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        if end - pos > MAX_CHUNK_LINE:
                            raise UpstreamProtocolError(
                                "the upstream's chunk-size line is too long"
                            )
                        self._line = data[pos:]
                        break
                    size = _chunk_size(data[pos:eol])
                    pos = eol + 2
                    if size == 0:
                        self._left = 0
                        self._mode = _TRAILERS
                        self._trailers(data[pos:])
                        return
                    stop = pos + size
                    if stop + 2 <= end and data[stop] == 13 and data[stop + 1] == 10:
                        self._deliver(data[pos:stop])  # the usual whole chunk, at once
                        pos = stop + 2
                    else:
                        left = size
        except UpstreamProtocolError as exc:
            self._broken(exc)
            return
        self._left = left

    def _trailers(self, data: bytes) -> None:
        """The trailer section (ignored) and the empty line that ends the message."""
        if data[:2] == b"\r\n":
            rest = data[2:]
        else:
            at = data.find(b"\r\n\r\n")
            if at < 0:
                if len(data) > MAX_HEAD_BYTES:
                    self._broken(UpstreamProtocolError("the upstream's trailers exceed 64 KiB"))
                else:
                    self._line = data
                return
            rest = data[at + 4 :]
        self._line = b""
        self._end_body(rest)


def _content_length(values: Sequence[str]) -> int | None:
    """The one length that ``Content-Length`` values agree on (``2, 2`` included), or None
    when there is none or they disagree or are not plain decimal numbers."""
    found = {v.strip() for joined in values for v in joined.split(",")}
    length = found.pop() if len(found) == 1 else ""
    if not length.isdigit() or not length.isascii() or len(length) > 19:
        return None
    return int(length)


def _chunk_size(line: bytes) -> int:
    semi = line.find(b";")
    if semi >= 0:
        line = line[:semi].rstrip(b" \t")  # chunk extensions are ignored
    if not line or len(line) > 15 or line.translate(None, _HEX):
        raise UpstreamProtocolError(f"the upstream sent an invalid chunk size {line[:32]!r}")
    return int(line, 16)


class Upstream:
    """Pooled HTTP/1.1 connections to one origin (``http://`` or ``https://``)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float | None = 5.0,
        keepalive: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
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
        self.keepalive = keepalive
        self._ssl: ssl.SSLContext | None = None
        if origin.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._idle: list[_Connection] = []
        """Connections waiting for a request, the most recently used last."""
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

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
            conn = self._take()
            if conn is None:
                conn = await self._connect()
            try:
                return await conn.exchange(head, body, method)
            except UpstreamDisconnected as exc:
                # The keep-alive race: the engine closed an idle connection as the
                # request went out. Only a request safe to repeat is sent again.
                if not (exc.before_response and conn.reused and method in IDEMPOTENT) or retried:
                    raise
                retried = True

    def put(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.reused = True
        conn.idle_since = conn.clock()
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

    # ------------------------------------------------------------ internals

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not self._stale(conn, conn.clock()):
                return conn
            conn.abort()
        return None

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
            raise UpstreamConnectTimeout(
                f"no connection to {self.origin} within {self.connect_timeout:g}s "
                "(upstream.connect_timeout)"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {self.origin}: {exc}") from exc
        return conn
