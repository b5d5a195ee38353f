"""concur's listening side: bind first, then start; errors of the HTTP layer as JSON.

:func:`bind` takes the address before anything else starts, so a busy port is one
clear error and nothing has said "started" yet; :class:`BoundSite` then serves the
application on it. Connections are handled by :class:`JsonErrorHandler`: a request
aiohttp cannot parse (a 100 KB header, a bad request line) gets an OpenAI-style JSON
error like every other concur error, which never echoes the input, instead of
aiohttp's plain-text 400 quoting it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
)

from concur import logs
from concur._errors import openai_error

log = logging.getLogger("concur.app")


def bad_request_text(exc: BaseException | None) -> str:
    """What is wrong with a request the HTTP parser refused, without quoting it."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        size = f" {limit} bytes" if isinstance(limit, int | str) and str(limit).isdigit() else ""
        what = f"a header or the request line is longer than the limit{size}"
    elif isinstance(exc, BadHttpMethod):
        what = "the request line has an unknown method (is this HTTP, not TLS?)"
    elif isinstance(exc, BadStatusLine):
        what = "the request line is malformed"
    elif isinstance(exc, InvalidHeader):
        what = "a header is malformed (its name, or a control character in its value)"
    elif isinstance(exc, PayloadEncodingError):
        what = "the body's framing (Content-Length or Transfer-Encoding) is invalid"
    else:
        what = "it is not valid HTTP/1.1"
    return f"concur could not read the request: {what}; nothing was forwarded to the engine"


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, with its own error answers in concur's JSON shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the response is already going out
            raise ConnectionError("the response is already being sent; cannot send an error")
        if status >= 500:
            log.error("request failed inside concur", exc_info=exc)
            resp = openai_error(
                status,
                "concur failed on this request (an internal error; its log has the details)",
                type_="server_error",
                code="internal_error",
            )
        else:
            text = bad_request_text(exc)
            logs.event(
                log,
                "request_rejected",
                logging.WARNING,
                status=status,
                reason="bad_http",
                error=type(exc).__name__ if exc is not None else "bad request",
                remote=request.remote,
            )
            resp = openai_error(
                status, text, type_="invalid_request_error", code="bad_http_request"
            )
        resp.force_close()
        return resp


class ListenError(OSError):
    """The address cannot be bound (in use, not local, no permission)."""


async def bind(host: str, port: int, backlog: int, runner: web.AppRunner) -> asyncio.Server:
    """Bind ``host:port`` now (raises :class:`ListenError` when it cannot) without
    accepting anything; connections are handled by ``runner``'s server, once set up,
    with :class:`JsonErrorHandler`."""

    def protocol() -> web.RequestHandler:
        server = runner.server
        assert server is not None, "runner.setup() comes before serving"
        handler = server()
        handler.__class__ = JsonErrorHandler  # the same object, with concur's error answers
        return handler

    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(protocol, host, port, backlog=backlog, start_serving=False)
    except OSError as exc:
        # asyncio's message repeats the address; the system's is enough beside it.
        code = exc.errno
        why = os.strerror(code) if isinstance(code, int) and code > 0 else exc.strerror
        raise ListenError(code, why or str(exc)) from exc


class BoundSite(web.BaseSite):
    """An aiohttp site on a socket :func:`bind` bound before the application started."""

    __slots__ = ("_bound",)

    def __init__(self, runner: web.AppRunner, bound: asyncio.Server, **kwargs: Any) -> None:
        super().__init__(runner, **kwargs)
        self._bound = bound

    @property
    def name(self) -> str:
        host, port = self._bound.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        self._server = self._bound
        await self._bound.start_serving()
