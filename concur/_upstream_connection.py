"""One connection to the upstream and the response it is reading (for :mod:`concur.upstream`).

The connection is an asyncio protocol: it writes a request, hands the bytes it
receives to its framer (:mod:`concur._framing`) and, told by the framer, fills
the :class:`UpstreamResponse` its requester reads, pausing the socket while
more than :data:`HIGH_WATER` bytes of body wait unread.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from concur._upstream_errors import UpstreamDisconnected, UpstreamError, UpstreamProtocolError

if TYPE_CHECKING:
    from concur.upstream import Upstream

HIGH_WATER = 256 << 10
"""Unread body bytes at which reading from the upstream pauses."""


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
    """One connection to the upstream: a :class:`~concur._framing.Sink` to its framer."""

    __slots__ = (
        "_fd",
        "_feed",
        "_framer",
        "_got",
        "_head_waiter",
        "_reading",
        "_resp",
        "clock",
        "closed",
        "counted",
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
        self.counted = False
        """Counted in the pool's open connections (until it closes)."""
        self.idle_since = 0.0
        self._fd = -1
        """The socket's descriptor, for :meth:`peer_closed` (-1: unknown)."""
        self._framer = pool.framer(self, loop)
        self._feed = self._framer.feed
        self._reading = False
        """A response is expected or under way (until its body ends)."""
        self._got = False
        """Bytes of the response under way have arrived."""
        self._resp: UpstreamResponse | None = None
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None

    # ------------------------------------------------------------ exchange

    async def exchange(self, head: bytes, body: bytes | None, method: str) -> UpstreamResponse:
        """Send one request; its response once the headers are in.

        Raises :class:`UpstreamDisconnected` with ``unsent`` when the connection is
        found closed before any byte of the request went out: already closed, or the
        first write failing at once (the engine reset the connection).
        """
        transport = self.transport
        assert transport is not None and not self._reading
        if self.closed or transport.is_closing():
            self.abort()
            raise UpstreamDisconnected(
                "the upstream closed the connection before the request was sent",
                before_response=True,
                unsent=True,
            )
        self._resp = UpstreamResponse(self)
        self._reading = True
        self._got = False
        self._framer.begin(method == "HEAD")
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._head_waiter = waiter
        # A write the socket refuses at once (reset) closes the transport before it
        # returns, with none of its bytes sent (asyncio tries the send right away).
        if not body:
            transport.write(head)
        elif len(body) < 1 << 16:
            transport.write(head + body)
        else:
            transport.write(head)
            if not transport.is_closing():
                transport.write(body)
                head = b""  # sent: a failure from now on is not "unsent"
        if transport.is_closing() and head:
            self._head_waiter = None
            self.abort()
            raise UpstreamDisconnected(
                "the upstream reset the connection before the request was sent",
                before_response=True,
                unsent=True,
            )
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
        if whole and not self._reading and self._framer.reusable and not self.closed:
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self._reading = False
        self._resp = None
        if self.transport is not None:
            self.transport.abort()
        self._gone()

    def peer_closed(self) -> bool:
        """Whether an idle connection has anything to read: the engine's FIN or reset
        (or bytes nobody asked for) that the event loop has not handled yet. One
        ``poll`` call, so a request is not written to a connection already closed."""
        if self.closed:
            return True
        if self._fd < 0:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    def _gone(self) -> None:
        if self.counted:
            self.counted = False
            self.pool._left()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(select, "poll"):
            try:
                self._fd = sock.fileno()
            except (OSError, ValueError):  # pragma: no cover - a socket already closed
                self._fd = -1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._gone()
        if not self._reading:
            return
        if exc is None and self._framer.feed_eof():  # a clean close is this body's end
            return
        self._reading = False
        before = not self._got
        why = f" ({exc})" if exc is not None else ""
        what = "before answering" if before else "before its response ended"
        self._fail(
            UpstreamDisconnected(
                f"the upstream closed the connection {what}{why}", before_response=before
            )
        )

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            self._broken(UpstreamProtocolError("the upstream sent data nobody asked for"))
            return
        self._got = True
        try:
            self._feed(data)
        except UpstreamProtocolError as exc:
            self._broken(exc)

    def eof_received(self) -> bool | None:
        self.closed = True  # never handed out again, even before connection_lost runs
        return None  # close the transport: connection_lost ends or fails the exchange

    # ------------------------------------------------------ told by the framer

    def on_head(
        self,
        status: int,
        reason: str,
        version: tuple[int, int],
        headers: CIMultiDict[str],
        length: int | None,
    ) -> None:
        resp = self._resp
        waiter = self._head_waiter
        if resp is None or waiter is None or waiter.done():  # the requester gave up meanwhile
            self.abort()
            return
        resp.status = status
        resp.reason = reason
        resp.version = version
        resp.headers = headers
        resp.length = length
        keepalive = headers.get("Keep-Alive")
        if keepalive is not None:
            self.pool.engine_keepalive(keepalive)
        waiter.set_result(resp)

    def on_body(self, piece: bytes) -> None:
        resp = self._resp
        if resp is None:
            return
        resp._feed(piece)
        if resp._size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_end(self) -> None:
        self._reading = False
        if self._resp is not None:
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
