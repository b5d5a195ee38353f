"""What concur's upstream client raises (re-exported by :mod:`concur.upstream`)."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be reached, or broke HTTP: the proxy answers 502."""


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream."""


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    """No connection within ``upstream.connect_timeout``: the proxy answers 504."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before its response ended.

    ``before_response``: no byte of the response came; ``unsent``: no byte of the
    request went out either (so any request may be sent again).
    """

    def __init__(self, message: str, *, before_response: bool, unsent: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.unsent = unsent


class UpstreamProtocolError(UpstreamError):
    """The upstream's response is not HTTP/1.1 this client accepts."""


class InvalidRequestHead(ValueError):
    """A header, the method or the target would break the request's framing (CR or LF)."""
