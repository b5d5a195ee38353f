"""Overload protection for held request bodies: a byte budget (``server.max_held_bytes``).

The admission queue is bounded in agents (``admission.max_queue_len``), and each
request waiting at the gate keeps its body, up to ``server.max_body_bytes``: ten
thousand agents with 400 KB contexts would hold 4 GB. The budget bounds the bytes of
the bodies *waiting at the gate*: a new agent's first requests while it is queued,
and the steps of admitted agents held at the step boundary (paused, or held by
request-level gating). A request granted at once is not counted: it goes upstream
now, and those are bounded by the window.

A new agent whose body would take the held total past the budget is refused at once
(503 with ``Retry-After``, :func:`concur._admit.refusal`), as Envoy's overload manager
refuses new streams past its heap threshold; an admitted agent's step is counted and
never refused by the budget, since the window's agents must run for the queue to
move. The bytes are given back when the wait ends, whatever ends it (grant, timeout,
cancellation, shutdown).
"""

from __future__ import annotations

from concur.admission import AdmissionError

RETRY_AFTER = 5.0
"""Seconds a client refused by the budget is told to wait (``Retry-After``)."""


class OverBudget(AdmissionError):
    """A new agent's body does not fit in ``server.max_held_bytes``: 503, retry later."""

    reason = "overloaded"
    retry_after = RETRY_AFTER


class ByteBudget:
    """Bytes held by request bodies waiting at the gate, against ``limit`` (None: no limit)."""

    __slots__ = ("held", "limit", "peak", "refused")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0
        """Bytes counted now."""
        self.peak = 0
        """The most bytes counted at once."""
        self.refused = 0
        """Requests refused for want of room."""

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the limit."""
        return self.limit is None or self.held + size <= self.limit

    def take(self, size: int) -> None:
        """Count ``size`` bytes (whether they fit or not: see :meth:`fits`)."""
        self.held += size
        if self.held > self.peak:
            self.peak = self.held

    def give(self, size: int) -> None:
        """Stop counting ``size`` bytes taken before."""
        self.held -= size

    def refuse(self, size: int) -> OverBudget:
        """The error for a new agent whose ``size``-byte body does not fit."""
        self.refused += 1
        return OverBudget(
            f"concur holds {self.held} bytes of waiting request bodies and this one "
            f"({size} bytes) would pass its budget of {self.limit} (server.max_held_bytes); "
            "retry later"
        )
