"""concur's own HTTP/1.1 response parser (``upstream.framing = "builtin"``).

A small, strict parser in Python: the status line and headers (64 KiB at most),
then a ``Content-Length``, ``chunked`` or close-delimited body, de-chunked and
reported as it arrives. Anything it does not accept whole (an obsolete line fold,
a header name with spaces, a bare CR or LF, a malformed chunk) is an
:class:`UpstreamProtocolError`.
"""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict

from concur._framing import (
    CHUNKED,
    LENGTH,
    MAX_HEAD_BYTES,
    NO_BODY,
    UNTIL_CLOSE,
    Sink,
    body_framing,
    interim,
)
from concur._upstream_errors import UpstreamProtocolError

MAX_CHUNK_LINE = 4096
"""The longest chunk-size line (size and extensions) accepted."""
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX = b"0123456789abcdefABCDEF"

# What the parser is reading (``_mode``).
_IDLE = 0  # nothing: the response ended
_HEAD = 1  # the status line and headers
_LENGTH = 2  # a body of ``_left`` more bytes
_CHUNKED = 3  # a chunked body (``_left``: > 0 data bytes, 0 a size line, -1 a CRLF)
_TRAILERS = 4  # the trailer section after the last chunk
_UNTIL_CLOSE = 5  # a body that ends when the connection does
_MODES = {NO_BODY: _IDLE, LENGTH: _LENGTH, CHUNKED: _CHUNKED, UNTIL_CLOSE: _UNTIL_CLOSE}


class BuiltinFramer:
    """One connection's responses, read by concur's own parser."""

    __slots__ = (
        "_head",
        "_head_request",
        "_left",
        "_line",
        "_mode",
        "_on_body",
        "_sink",
        "reusable",
    )

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop) -> None:
        self._sink = sink
        self._on_body = sink.on_body
        self._mode = _IDLE
        self._head_request = False
        self._head = bytearray()
        self._line = b""
        self._left = 0
        self.reusable = False

    def begin(self, head_request: bool) -> None:
        self._mode = _HEAD
        self._head_request = head_request
        self._head.clear()
        self._line = b""
        self._left = 0
        self.reusable = False

    def feed(self, data: bytes) -> None:
        mode = self._mode
        if mode == _CHUNKED:
            self._chunked(data)
        elif mode == _LENGTH:
            self._length(data)
        elif mode == _HEAD:
            self._head_data(data)
        elif mode == _UNTIL_CLOSE:
            self._on_body(data)
        elif mode == _TRAILERS:
            self._trailers(self._line + data)
        else:  # after the response: never reuse this connection
            self.reusable = False

    def feed_eof(self) -> bool:
        if self._mode != _UNTIL_CLOSE:
            return False
        self._mode = _IDLE
        self._sink.on_end()
        return True

    # ------------------------------------------------------------- parsing

    def _end(self, rest: bytes) -> None:
        self._mode = _IDLE
        if rest:  # more than the response framed: never reuse this connection
            self.reusable = False
        self._sink.on_end()

    def _head_data(self, data: bytes) -> None:
        head = self._head
        if head:
            head += data
            data = bytes(head)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                raise UpstreamProtocolError("the upstream's response headers exceed 64 KiB")
            if not head:
                head += data
            return
        head.clear()
        if end > MAX_HEAD_BYTES:
            raise UpstreamProtocolError("the upstream's response headers exceed 64 KiB")
        rest = data[end + 4 :]
        if self._parse_head(data[:end]):  # 1xx: the real response follows
            if rest:
                self._head_data(rest)
            return
        if self._mode == _IDLE:
            self._end(rest)
        elif rest:
            self.feed(rest)

    def _parse_head(self, block: bytes) -> bool:
        """Report the head and set the body's framing; True for an interim 1xx."""
        lines = block.split(b"\r\n")
        n = len(lines) - 1
        if block.count(b"\n") != n or block.count(b"\r") != n or b"\x00" in block:
            raise UpstreamProtocolError("the upstream's response head has a bare CR, LF or NUL")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version == b"HTTP/1.1":
            ver = (1, 1)
        elif version == b"HTTP/1.0":
            ver = (1, 0)
        else:
            raise UpstreamProtocolError(f"the upstream answered {lines[0][:64]!r}, not HTTP/1.x")
        if len(code) != 3 or not code.isdigit():
            raise UpstreamProtocolError(f"the upstream answered status {code[:16]!r}")
        status = int(code)
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name.translate(None, _TOKEN):
                raise UpstreamProtocolError(
                    f"the upstream sent a malformed header line {line[:64]!r}"
                )
            headers.add(
                name.decode("ascii"), value.strip(b" \t").decode("utf-8", "surrogateescape")
            )
        if interim(status):
            return True
        kind, length, self.reusable = body_framing(status, ver, headers, self._head_request)
        self._mode = _MODES[kind]
        self._left = length or 0
        self._sink.on_head(status, reason.decode("latin-1"), ver, headers, length)
        return False

    def _length(self, data: bytes) -> None:
        left = self._left
        n = len(data)
        if n < left:
            self._left = left - n
            self._on_body(data)
            return
        self._left = 0
        self._on_body(data if n == left else data[:left])
        self._end(data[left:])

    def _chunked(self, data: bytes) -> None:
        """De-chunk ``data``; ``_left`` carries the state (see ``_CHUNKED``)."""
        if self._line:
            data = self._line + data
            self._line = b""
        pos = 0
        end = len(data)
        left = self._left
        deliver = self._on_body
        while pos < end:
            if left > 0:  # inside a chunk's data
                stop = pos + left
                if stop <= end:
                    deliver(data[pos:stop] if pos or stop < end else data)
                    pos = stop
                    left = -1
                else:
                    deliver(data[pos:] if pos else data)
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
                        raise UpstreamProtocolError("the upstream's chunk-size line is too long")
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
                    deliver(data[pos:stop])  # the usual whole chunk, at once
                    pos = stop + 2
                else:
                    left = size
        self._left = left

    def _trailers(self, data: bytes) -> None:
        """The trailer section (ignored) and the empty line that ends the message."""
        if data[:2] == b"\r\n":
            rest = data[2:]
        else:
            at = data.find(b"\r\n\r\n")
            if at < 0:
                if len(data) > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError("the upstream's trailers exceed 64 KiB")
                self._line = data
                return
            rest = data[at + 4 :]
        self._line = b""
        self._end(rest)


def _chunk_size(line: bytes) -> int:
    semi = line.find(b";")
    if semi >= 0:
        line = line[:semi].rstrip(b" \t")  # chunk extensions are ignored
    if not line or len(line) > 15 or line.translate(None, _HEX):
        raise UpstreamProtocolError(f"the upstream sent an invalid chunk size {line[:32]!r}")
    return int(line, 16)
