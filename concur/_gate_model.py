"""The admission gate's data: its errors, agents, tickets, events and views.

Plain records the gate (:mod:`concur.admission`) keeps and hands out; no behaviour
beyond small properties. Imported from :mod:`concur.admission`, which re-exports
every public name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class AdmissionError(Exception):
    """A request the gate will not let through; ``reason`` is a short machine code."""

    reason = "rejected"
    retry_after: float | None = None


class QueueFull(AdmissionError):
    reason = "queue_full"


class QueueTimeout(AdmissionError):
    reason = "queue_timeout"


class AgentEnded(AdmissionError):
    reason = "agent_ended"


class GateClosed(AdmissionError):
    reason = "shutting_down"


class AgentState(StrEnum):
    """Where an agent is in the gate.

    ``queued``
        A new agent waiting for a slot (FIFO within a priority class).
    ``live``
        Admitted and running: its requests pass straight through.
    ``paused``
        Admitted, but its *next* request is held at the step boundary because the
        window shrank below the live count while pressure was high. An in-flight
        request is never touched. Paused agents resume before queued ones are admitted.
    """

    QUEUED = "queued"
    LIVE = "live"
    PAUSED = "paused"


class TicketStatus(StrEnum):
    WAITING = "waiting"
    GRANTED = "granted"
    DONE = "done"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


@dataclass(eq=False, slots=True)
class Agent:
    """One agent's row in the gate's table."""

    agent_id: str
    seq: int
    state: AgentState
    since: float
    last_seen: float
    priority: int = 0
    context_tokens: int = 0
    requests: int = 0
    in_flight: int = 0
    ending: bool = False
    last_done: float | None = None
    """When its last request finished, until its next one comes (its tool call's start)."""
    admitted_at: float | None = None
    longest_pause: float | None = None
    """Its longest pause so far between a response and its next request (a tool call);
    None until it came back once. Its idle timeout adapts to it (:class:`concur._idle.IdleRule`)."""
    gone_at: float | None = None
    """When its client hung up on a request it was waiting for (its connection closed
    before the response ended), until it sends again or a response reaches it."""
    pending: list[Ticket] = field(default_factory=list)
    """Its requests waiting at the gate, oldest first (a list: rarely more than one, and
    a deque costs 600 bytes for every queued agent)."""

    def back_from_tool(self, now: float) -> float | None:
        """It sent a request at ``now``: it is seen and not gone, and if it was in a tool
        call, that call is over; returns the call's length (None: it was in none)."""
        self.last_seen = now
        self.gone_at = None
        if self.last_done is None:
            return None
        pause = now - self.last_done
        if self.longest_pause is None or pause > self.longest_pause:
            self.longest_pause = pause
        self.last_done = None
        return pause


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's passage through the gate."""

    agent_id: str
    created_at: float
    context_tokens: int = 0
    done: bool = False
    status: TicketStatus = TicketStatus.WAITING
    error: AdmissionError | None = None
    granted_at: float | None = None
    new_agent: bool = False
    """This request was its agent's first: it waited in the admission queue."""
    held: bool = False
    """Held by request-level gating (``epp``), not by agent admission."""
    usage_tokens: int | None = None
    """Set by the caller before :meth:`AdmissionGate.finish`: the agent's context after
    this request (prompt + completion tokens), for working-set pressure."""
    on_resolve: Callable[[Ticket], None] | None = None
    client_gone: bool = False
    """Set by the caller before :meth:`AdmissionGate.finish`: the client hung up before
    the response ended (its agent may be gone: see ``disconnect_grace``)."""
    agent: Agent | None = None
    """The admitted agent this ticket counts in (``in_flight``) once granted or held: an
    agent ended and admitted again under the same id is a new row the old ticket must not
    touch."""

    @property
    def granted(self) -> bool:
        return self.status is TicketStatus.GRANTED

    @property
    def waited(self) -> float | None:
        return None if self.granted_at is None else self.granted_at - self.created_at


@dataclass(frozen=True, slots=True)
class GateEvent:
    """Something the gate did, for logs and metrics."""

    kind: str
    """admitted, queued, full, timeout, cancelled, paused, resumed, ended, held, released,
    gone (a client hung up mid-request)."""
    agent_id: str
    at: float
    waited: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Pace:
    """Cumulative timing of the agents' requests; policies read differences between ticks.

    What it takes to weigh the engine's idle time against the agents' tool calls: how
    long the engine had at least one request of theirs, how long requests took, and
    how long agents spent between a response and their next request.
    """

    busy_s: float = 0.0
    """Time with at least one granted request in flight (the engine had work)."""
    requests: int = 0
    """Granted requests that ended (finished or given up)."""
    latency_s: float = 0.0
    """Sum of those requests' times from grant to end."""
    tools: int = 0
    """Returns from a tool call: an admitted agent's request after its previous response."""
    tool_s: float = 0.0
    """Sum of those pauses."""
    served_tokens: int = 0
    """Context tokens of the finished requests that reported their usage (prompt and
    completion): work done, in a unit that grows with the agents' contexts."""


@dataclass(frozen=True, slots=True)
class GateView:
    """A consistent snapshot of the gate, for policies and status pages."""

    window: int | None
    live: int
    paused: int
    queued: int
    held: int
    live_tokens: int
    live_contexts_newest_first: tuple[int, ...]
    live_steps_newest_first: tuple[int, ...]
    """Requests each live agent has finished, in the order of the contexts above."""
    candidate_contexts: tuple[int, ...]
    pace: Pace = Pace()
    draining: int = 0
    """Paused agents whose last request is still in the engine: the cache they hold frees
    as it ends, whatever the window."""

    @property
    def active(self) -> int:
        """Admitted agents, live or paused."""
        return self.live + self.paused


class GateObserver(Protocol):
    """What the gate tells of the agents' progress beyond its :class:`GateEvent`: the
    facts a feature learned on the policy side needs (see ``concur._features``)."""

    def step_finished(self, agent: Agent, usage_tokens: int) -> None:
        """A granted request of ``agent`` finished with its context at ``usage_tokens``;
        ``agent.requests`` counts it already."""

    def agent_ended(self, agent: Agent, reason: str) -> None:
        """An admitted ``agent`` ended (``reason`` as in the ``ended`` event)."""
