"""Response framing by llhttp through httptools (``upstream.framing = "httptools"``).

llhttp (C, Node.js's parser) does the lexing and the de-chunking, as it does for
uvicorn in front of vLLM; concur's own rules (:func:`concur._framing.body_framing`)
decide what the head means and what is refused. Where llhttp cannot be told
something, the framer stops it by raising from a callback:

* a response to HEAD has no body whatever its headers say (httptools cannot tell
  llhttp to skip it): the body ends with the head, and the connection is reused
  only when those bytes ended exactly with the head;
* bytes after the response (llhttp would parse them as the next one) make the
  connection single-use, like concur's own parser does.

llhttp is strict where RFC 9112 lets a client choose: a ``Content-Length`` list
(``2, 2``) is refused. A chunked body that also has a ``Content-Length`` is read
as chunked (the connection is then closed after), as concur's own parser does.
"""

from __future__ import annotations

import asyncio

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)
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

_HEAD_TOO_LARGE = "the upstream's response headers exceed 64 KiB"
_MALFORMED = "the upstream's response is malformed"


class _Stop(Exception):
    """Raised from a callback: llhttp must not go on (see the module's docstring)."""


class HttptoolsFramer:
    """One connection's responses, read by llhttp (a parser per exchange)."""

    __slots__ = (
        "_ended",
        "_fed",
        "_head_bytes",
        "_head_request",
        "_headers",
        "_interim",
        "_kind",
        "_parser",
        "_reason",
        "_sink",
        "on_body",
        "reusable",
    )

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop) -> None:
        self._sink = sink
        self.on_body = sink.on_body
        """llhttp's body callback is the sink's own: no call in between per piece."""
        self._parser: HttpResponseParser | None = None
        self._head_request = False
        self._reason = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._head_bytes = 0
        self._fed = 0
        self._interim = False
        self._kind: int | None = None
        self._ended = False
        self.reusable = False

    def begin(self, head_request: bool) -> None:
        parser = HttpResponseParser(self)
        parser.set_dangerous_leniencies(
            lenient_chunked_length=True, lenient_spaces_after_chunk_size=True
        )
        self._parser = parser
        self._head_request = head_request
        self._new_head()
        self._fed = 0
        self._kind = None
        self._ended = False
        self.reusable = False

    def feed(self, data: bytes) -> None:
        parser = self._parser
        assert parser is not None
        if self._kind is None:  # in the head, which llhttp does not bound
            self._fed += len(data)
        try:
            parser.feed_data(data)
        except HttpParserCallbackError as exc:
            self._stopped(exc.__context__, data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if not self._ended:
                raise UpstreamProtocolError(f"{_MALFORMED}: {exc}") from None
            self.reusable = False  # bytes after the response that are not one
        if self._kind is None and self._fed > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(_HEAD_TOO_LARGE)

    def feed_eof(self) -> bool:
        if self._kind != UNTIL_CLOSE or self._ended:
            return False
        self._ended = True
        self._sink.on_end()
        return True

    def _stopped(self, why: BaseException | None, data: bytes) -> None:
        """llhttp stopped on an exception from a callback: ``why``."""
        if isinstance(why, _Stop):
            if self._head_request and self.reusable:  # only the head, and nothing after?
                self.reusable = data.endswith(b"\r\n\r\n")
            else:
                self.reusable = False
            return
        if why is not None:
            raise why  # UpstreamProtocolError, or a bug in the sink
        raise UpstreamProtocolError("the upstream's response stopped its parser")

    def _new_head(self) -> None:
        self._reason = b""
        self._headers = CIMultiDict()
        self._head_bytes = 0

    # ---------------------------------------------------- llhttp's callbacks

    def on_message_begin(self) -> None:
        if self._ended:
            raise _Stop  # a second response: nobody asked for it

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(
                _HEAD_TOO_LARGE if self._kind is None else "the upstream's trailers exceed 64 KiB"
            )
        if self._kind is None:  # trailers are ignored
            self._headers.add(
                name.decode("ascii"), value.rstrip(b" \t").decode("utf-8", "surrogateescape")
            )

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if interim(status):
            self._interim = True
            self._new_head()
            return
        version = http_version(parser.get_http_version())
        headers = self._headers
        kind, length, self.reusable = body_framing(status, version, headers, self._head_request)
        self._kind = kind
        self._head_bytes = 0  # from now on: the trailers'
        self._sink.on_head(status, self._reason.decode("latin-1"), version, headers, length)
        if self._head_request:  # llhttp would wait for the body the headers declare
            self._ended = True
            self._sink.on_end()
            raise _Stop

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._ended = True
        self._sink.on_end()
