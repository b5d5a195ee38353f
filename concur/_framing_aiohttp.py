"""Response framing by aiohttp's C parser (``upstream.framing = "aiohttp"``).

aiohttp's ``HttpResponseParser`` (llhttp, in C) is usable without aiohttp's
client: it takes bytes and returns the messages it completed, each with a body
``StreamReader`` it feeds. The reader is aiohttp's own (the C parser creates it),
in Python, and asks its protocol for flow control; here that protocol does
nothing (concur's response applies the back-pressure), and the framer drains
the reader after every feed (``read_nowait``) into the sink. So this measures
aiohttp's framing as its client runs it, minus the client's session layers.

It is stricter than concur's own parser where RFC 9112 lets a client choose: a
``Content-Length`` list (``2, 2``) or one beside ``Transfer-Encoding: chunked``
is refused, and so is a response followed by stray bytes in the same read
(aiohttp drops the messages of a read that ends in a parse error).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import http_parser
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from concur._framing import (
    MAX_HEAD_BYTES,
    UNTIL_CLOSE,
    Sink,
    body_framing,
    http_version,
    interim,
)
from concur._upstream_errors import UpstreamProtocolError

C_PARSER = http_parser.HttpResponseParser is not http_parser.HttpResponseParserPy
"""Whether aiohttp's C parser is the one in use (it is unless AIOHTTP_NO_EXTENSIONS)."""
_HEAD_TOO_LARGE = "the upstream's response headers exceed 64 KiB"
_MALFORMED = "the upstream's response is malformed"


class _NoFlow:
    """The protocol aiohttp's body reader pauses and resumes: nothing to do here."""

    __slots__ = ()
    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


_FLOW: Any = _NoFlow()


class AiohttpFramer:
    """One connection's responses, read by aiohttp's parser (a parser per exchange)."""

    __slots__ = (
        "_ended",
        "_fed",
        "_head_request",
        "_kind",
        "_loop",
        "_parser",
        "_payload",
        "_sink",
        "reusable",
    )

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop) -> None:
        self._sink = sink
        self._loop = loop
        self._parser: http_parser.HttpResponseParser | None = None
        self._payload: StreamReader | None = None
        self._head_request = False
        self._kind: int | None = None
        self._ended = False
        self._fed = 0
        self.reusable = False

    def begin(self, head_request: bool) -> None:
        self._parser = http_parser.HttpResponseParser(
            _FLOW,
            self._loop,
            1 << 16,
            max_line_size=MAX_HEAD_BYTES,
            max_field_size=MAX_HEAD_BYTES,
            max_headers=MAX_HEAD_BYTES // 4,
            response_with_body=not head_request,
            read_until_eof=True,
            auto_decompress=False,
        )
        self._head_request = head_request
        self._payload = None
        self._kind = None
        self._ended = False
        self._fed = 0
        self.reusable = False

    def feed(self, data: bytes) -> None:
        parser = self._parser
        assert parser is not None
        if self._kind is None:
            self._fed += len(data)
        try:
            messages, _, _ = parser.feed_data(data)
        except HttpProcessingError as exc:
            if self._ended:
                self.reusable = False  # bytes after the response that are not one
                return
            if isinstance(exc, LineTooLong):
                raise UpstreamProtocolError(_HEAD_TOO_LARGE) from None
            why = " ".join(exc.message.split())  # (aiohttp's messages span lines)
            raise UpstreamProtocolError(f"{_MALFORMED}: {why}") from None
        for message, reader in messages:
            self._message(message, reader)
        if self._kind is None and self._fed > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(_HEAD_TOO_LARGE)
        payload = self._payload
        if payload is not None:
            self._drain(payload)

    def feed_eof(self) -> bool:
        payload = self._payload
        if self._kind != UNTIL_CLOSE or payload is None:
            return False
        assert self._parser is not None
        try:
            self._parser.feed_eof()
        except HttpProcessingError:
            return False
        self._drain(payload)
        return self._ended

    def _drain(self, payload: StreamReader) -> None:
        """Hand what the body reader holds to the sink; end the body at its end."""
        try:
            piece = payload.read_nowait()
        except Exception as exc:  # what the parser set on the reader
            raise UpstreamProtocolError(f"{_MALFORMED}: {exc}") from None
        if piece:
            self._sink.on_body(piece)
        if payload.is_eof():
            self._payload = None
            self._ended = True
            self._sink.on_end()

    def _message(self, message: http_parser.RawResponseMessage, payload: StreamReader) -> None:
        if self._ended or self._kind is not None:  # a second response: nobody asked for it
            self.reusable = False
            return
        status = message.code
        if interim(status):
            return
        version = http_version(f"{message.version[0]}.{message.version[1]}")
        headers: CIMultiDict[str] = CIMultiDict()
        size = 0
        for name, value in message.raw_headers:
            size += len(name) + len(value) + 4
            headers.add(name.decode("ascii"), value.decode("utf-8", "surrogateescape"))
        if size > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(_HEAD_TOO_LARGE)
        kind, length, self.reusable = body_framing(status, version, headers, self._head_request)
        self._kind = kind
        self._payload = payload
        self._sink.on_head(status, message.reason, version, headers, length)
