"""Relay: the last layer of the request path (inspect, admit, forward, relay).

The upstream response goes to the client chunk by chunk as it arrives
(``web.StreamResponse``), never buffered, with its end-to-end headers and
``X-Concur-Request-Id``. On the way two things watch it:

* the usage tap: for a granted step's successful response, the engine's ``usage``
  (from the final SSE chunk, or the JSON body) becomes ``ticket.usage_tokens``, the
  agent's context size; the usage-only chunk an injected ``include_usage`` added is
  dropped (:class:`concur.usage.SSEUsage`);
* the send watch: a client that reads nothing for ``server.send_timeout`` while a
  write to it waits is cut off (:class:`concur.deadlines.SendWatch`), which frees its
  agent's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from aiohttp import web

from concur import logs
from concur._headers import RESPONSE_SKIP, filtered, skipped
from concur._inspect import Step
from concur.admission import Ticket
from concur.deadlines import Deadlines, SendWatch
from concur.upstream import UpstreamError, UpstreamResponse
from concur.usage import SSEUsage, usage_from_json

log = logging.getLogger("concur.proxy")

try:  # the socket send queue's size, for the send timeout (Linux, macOS)
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - Windows
    _TIOCOUTQ = None

REQUEST_ID_HEADER = "X-Concur-Request-Id"
_MAX_USAGE_BODY = 4 << 20


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
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


class Relayer:
    """Relays upstream responses to clients; see the module docstring."""

    def __init__(self, send_timeout: float) -> None:
        self.send_timeout = send_timeout

    def _send_watch(
        self, request: web.Request, rid: str, step: Step, deadlines: Deadlines
    ) -> SendWatch:
        """Close the client's connection when it reads nothing for ``send_timeout`` s
        while a write to it waits."""
        limit = self.send_timeout

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
            return unsent_bytes(transport) if transport is not None else 0

        return SendWatch(deadlines, limit, stuck, unsent)

    async def relay(
        self,
        request: web.Request,
        rid: str,
        up: UpstreamResponse,
        ticket: Ticket | None,
        step: Step,
        deadlines: Deadlines,
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

        headers = filtered(up.headers, skipped(up.headers, RESPONSE_SKIP))
        headers[REQUEST_ID_HEADER] = rid
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if up.length is not None and (tracker is None or not tracker.strip):
            resp.content_length = up.length
        failure: BaseException | None = None
        read = up.read
        watch = self._send_watch(request, rid, step, deadlines)
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
            # The client went away (without handler cancellation): its agent may be gone.
            logs.event(log, "client_gone", logging.DEBUG, request_id=rid, agent=step.agent_id)
            if ticket is not None:
                ticket.client_gone = True
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
