"""Response framing for concur's upstream client: one small interface, three parsers.

A connection (:class:`Sink`) hands the bytes it receives to its :class:`Framer`,
which reports the final response's head, its de-chunked body pieces and its end
back to the connection, and raises :class:`UpstreamProtocolError` for anything it
does not accept whole. Three framers implement it (``upstream.framing``):

* ``builtin``: concur's own parser in Python (``_framing_builtin``);
* ``httptools``: llhttp in C, through httptools, as uvicorn reads requests
  (``_framing_httptools``);
* ``aiohttp``: aiohttp's C response parser (llhttp too) and its body
  ``StreamReader``, driven without aiohttp's protocol (``_framing_aiohttp``).

What a final head means for its body (RFC 9112, section 6.3), and which heads
are refused whatever parsed them, is decided once, here (:func:`body_framing`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, get_args

from multidict import CIMultiDict

from concur._upstream_errors import UpstreamProtocolError

Framing = Literal["builtin", "httptools", "aiohttp"]
"""The response parsers :class:`concur.upstream.Upstream` can use."""
FRAMINGS: tuple[Framing, ...] = get_args(Framing)

MAX_HEAD_BYTES = 64 << 10
"""The largest response head (status line and headers), or trailer section, accepted."""

# How a final response's body ends (the first item of body_framing()).
NO_BODY = 0  # with the head (HEAD, 204, 304)
LENGTH = 1  # after Content-Length bytes
CHUNKED = 2  # at the last chunk and the trailers
UNTIL_CLOSE = 3  # when the connection closes


class Sink(Protocol):
    """What a framer reports to: the connection reading the response."""

    def on_head(
        self,
        status: int,
        reason: str,
        version: tuple[int, int],
        headers: CIMultiDict[str],
        length: int | None,
    ) -> None:
        """The final response's head (interim 1xx heads are skipped by the framer);
        ``length`` is the one ``Content-Length`` framed the body by, else None."""

    def on_body(self, piece: bytes) -> None:
        """Body bytes (de-chunked), in order."""

    def on_end(self) -> None:
        """The body ended (right after :meth:`on_head` for a response without one)."""


class Framer(Protocol):
    """Reads the responses of one connection, one exchange at a time."""

    reusable: bool
    """After the body ended: whether the connection may carry another exchange (the
    framing said where the response ended, nothing said close, nothing followed it)."""

    def begin(self, head_request: bool) -> None:
        """A request went out: read its response (``head_request``: it has no body)."""

    def feed(self, data: bytes) -> None:
        """Bytes from the upstream, reported to the sink as they complete something.
        Raises :class:`UpstreamProtocolError`; the connection is not used again then."""

    def feed_eof(self) -> bool:
        """The upstream closed the connection cleanly: True if that ended the body (a
        close-delimited one: :meth:`Sink.on_end` was called), False if it cut it short."""


FramerFactory = Callable[[Sink, asyncio.AbstractEventLoop], Framer]


def framer_factory(framing: str) -> FramerFactory:
    """The framer class for ``framing`` (one of :data:`FRAMINGS`)."""
    if framing == "builtin":
        from concur._framing_builtin import BuiltinFramer

        return BuiltinFramer
    if framing == "httptools":
        from concur._framing_httptools import HttptoolsFramer

        return HttptoolsFramer
    if framing == "aiohttp":
        from concur._framing_aiohttp import AiohttpFramer

        return AiohttpFramer
    raise ValueError(f"framing {framing!r}: use one of {', '.join(FRAMINGS)}")


def interim(status: int) -> bool:
    """Whether ``status`` is an interim (1xx) response, which the final one follows."""
    if 100 <= status < 200:
        if status == 101:
            raise UpstreamProtocolError("the upstream switched protocols (101), unsupported")
        return True
    return False


def body_framing(
    status: int, version: tuple[int, int], headers: CIMultiDict[str], head_request: bool
) -> tuple[int, int | None, bool]:
    """How a final response's body is framed: (:data:`NO_BODY`, :data:`LENGTH`,
    :data:`CHUNKED` or :data:`UNTIL_CLOSE`; the length ``Content-Length`` framed it by,
    or for a HEAD response the one it declares; whether the connection may be reused).

    Refused (:class:`UpstreamProtocolError`): lengths that disagree or are not plain
    decimal numbers, and a transfer coding other than ``chunked``.
    """
    connection = headers.getall("Connection", ())
    tokens = ",".join(connection).lower() if connection else ""
    keep_alive = "close" not in tokens if version == (1, 1) else "keep-alive" in tokens
    lengths = headers.getall("Content-Length", ())
    declared = content_length(lengths)
    if head_request or status in (204, 304):
        return NO_BODY, declared if head_request else None, keep_alive
    coding = headers.getall("Transfer-Encoding", ())
    if coding:
        codings = [c.strip().lower() for v in coding for c in v.split(",")]
        if codings != ["chunked"]:
            raise UpstreamProtocolError(
                f"the upstream used Transfer-Encoding {', '.join(codings)!r}; "
                "only 'chunked' is supported"
            )
        # RFC 9112 6.3: a message with both is to be closed after.
        return CHUNKED, None, keep_alive and not lengths
    if lengths:
        if declared is None:
            raise UpstreamProtocolError(
                f"the upstream sent an invalid Content-Length {', '.join(lengths)!r}"
            )
        return (LENGTH if declared else NO_BODY), declared, keep_alive
    return UNTIL_CLOSE, None, False


def content_length(values: Sequence[str]) -> int | None:
    """The one length that ``Content-Length`` values agree on (``2, 2`` included), or None
    when there is none or they disagree or are not plain decimal numbers."""
    found = {v.strip() for joined in values for v in joined.split(",")}
    length = found.pop() if len(found) == 1 else ""
    if not length.isdigit() or not length.isascii() or len(length) > 19:
        return None
    return int(length)


def http_version(text: str) -> tuple[int, int]:
    """``(1, 1)`` or ``(1, 0)`` for "1.1" or "1.0"; any other version is refused."""
    if text == "1.1":
        return (1, 1)
    if text == "1.0":
        return (1, 0)
    raise UpstreamProtocolError(f"the upstream answered HTTP/{text[:16]}, not HTTP/1.x")
