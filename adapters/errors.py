"""Errors raised by the engine adapters.

Every failure to read an engine's state surfaces as an :class:`AdapterError`, so
callers (the poller) need to catch exactly one exception type and can show its
message to a user as is: the message says what was read, what was wrong with it
and, where there is one, what to do.
"""

from __future__ import annotations


class AdapterError(Exception):
    """The engine's metrics could not be fetched or understood."""


class ScrapeError(AdapterError):
    """The HTTP request for the engine's metrics failed (refused, timed out, non-2xx)."""
