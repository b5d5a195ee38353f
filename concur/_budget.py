"""Overload protection for held request bodies: a byte budget (``server.max_held_bytes``).

The admission queue is bounded in agents (``admission.max_queue_len``), and each
request waiting at the gate keeps its body, up to ``server.max_body_bytes``: ten
thousand agents with 400 KB contexts would hold 4 GB. The budget bounds the bytes of
the agent steps' bodies concur holds: counted from when reading them starts (their
``Content-Length``; a chunked body once read) until their response ends, through the
wait at the gate (queued or held) and the request upstream.

A new agent whose body would take the held total past the budget is refused at once
(503 with ``Retry-After``, :func:`concur._admit.refusal`), as Envoy's overload manager
refuses new streams past its heap threshold: before its body is read when its headers
name it (:func:`header_agent`) or it is anonymous, else once the body named it. An
admitted agent's step is counted and never refused by the budget, since the window's
agents must run for the queue to move (they are bounded by the window); so is a step
that bypasses the gate. Every byte is given back when its request ends, however it
ends.
"""

from __future__ import annotations

from collections.abc import Mapping

from concur.admission import AdmissionError, AdmissionGate, AgentState
from concur.identity import IdentityError, IdentityExtractor

RETRY_AFTER = 5.0
"""Seconds a client refused by the budget is told to wait (``Retry-After``)."""


class OverBudget(AdmissionError):
    """A new agent's body does not fit in ``server.max_held_bytes``: 503, retry later."""

    reason = "overloaded"
    retry_after = RETRY_AFTER


class ByteBudget:
    """Bytes held by agent steps' request bodies, against ``limit`` (None: no limit)."""

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
            f"concur is overloaded: it holds {self.held} bytes of request bodies, and this "
            f"one ({size} bytes) would pass its budget of {self.limit} bytes "
            "(server.max_held_bytes); retry later"
        )


def header_agent(identity: IdentityExtractor, headers: Mapping[str, str]) -> str | None:
    """The agent a request's headers name, when no body source comes before that header
    in ``admission.identity`` (the body could name another); else None."""
    try:
        found = identity.extract(headers, None)
    except IdentityError:
        return None  # the inspect layer answers it
    if found is None:
        return None
    for source in identity.sources:
        if source is found[1]:
            return found[0]
        if source.kind == "body":
            return None
    return None  # pragma: no cover - extract returns one of the sources


def new_agent(gate: AdmissionGate, agent_id: str) -> bool:
    """Whether a request of ``agent_id`` is a new agent's (not admitted: unknown or queued)."""
    agent = gate.get(agent_id)
    return agent is None or agent.state is AgentState.QUEUED
