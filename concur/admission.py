"""The admission gate: which agents may run now, and who waits.

One gate serves the proxy (on ``time.monotonic``) and the simulator (on a
virtual clock). It is synchronous and sans-IO: :meth:`AdmissionGate.submit`
returns a :class:`Ticket` that is granted at once or later, through a callback.
The proxy waits for it with a :class:`concur.Permit` (``concur._admit``), the
simulator schedules on the callback. What the policy side learns from the agents'
progress (their context growth, see ``concur._features``) it learns through a
:class:`GateObserver`; the gate itself keeps the agent table, the window, the queue
and the requests' timing (:class:`Pace`).

Agents move through three states:

``queued``
    A new agent waiting for a slot (FIFO within a priority class).
``live``
    Admitted and running: its requests pass straight through.
``paused``
    Admitted, but its *next* request is held at the step boundary because the
    window shrank below the live count while pressure was high. An in-flight
    request is never touched. Paused agents resume before queued ones are admitted.

The window bounds live agents. Accounting is exact on every path: once all
agents end, ``active == 0`` and ``queued == 0``.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

Clock = Callable[[], float]

_context_tokens = operator.attrgetter("context_tokens")
_priority = operator.attrgetter("priority")
_requests = operator.attrgetter("requests")


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
    pending: list[Ticket] = field(default_factory=list)
    """Its requests waiting at the gate, oldest first (a list: rarely more than one, and
    a deque costs 600 bytes for every queued agent)."""


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
    """admitted, queued, full, timeout, cancelled, paused, resumed, ended, held, released."""
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


class AdmissionGate:
    """Agent table, window, FIFO queue and idle reaper; time comes from ``clock``."""

    def __init__(
        self,
        *,
        clock: Clock,
        window: int | None = None,
        max_queue_len: int | None = None,
        max_queue_wait: float | None = None,
        idle_timeout: float | None = None,
        on_event: Callable[[GateEvent], None] | None = None,
    ) -> None:
        self._clock = clock
        self.window = window
        self.max_queue_len = max_queue_len
        self.max_queue_wait = max_queue_wait
        self.idle_timeout = idle_timeout
        self.on_event = on_event
        self.hold_requests = False
        self.admit_new = True
        """False: queued agents wait whatever the window (see :meth:`apply`)."""
        self.observer: GateObserver | None = None
        """Told of finished steps and ended agents (set by the policy side's features)."""
        self._seq = itertools.count()
        self._admitted: dict[str, Agent] = {}
        self._queue: dict[str, Agent] = {}
        self._held: deque[Ticket] = deque()
        self._live = 0
        self._paused = 0
        self._closed = False
        # Pace (see Pace): granted requests in flight now, since when the engine has had
        # one, and the running sums.
        self._granted_now = 0
        self._busy_from = 0.0
        self._busy_s = 0.0
        self._ended_requests = 0
        self._latency_s = 0.0
        self._tools = 0
        self._tool_s = 0.0
        self._served_tokens = 0
        # Whether any agent ever came with a priority other than 0. Until one does the
        # queue is plain FIFO, and picking the next agent must not scan it (O(n) per
        # admission made admitting hundreds from a queue of thousands take 0.2 s).
        self._prioritized = False

    # ----------------------------------------------------------------- views

    @property
    def live(self) -> int:
        return self._live

    @property
    def paused(self) -> int:
        return self._paused

    @property
    def active(self) -> int:
        return self._live + self._paused

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held(self) -> int:
        return len(self._held)

    def agents(self) -> Iterator[Agent]:
        """Admitted agents in admission order, then queued ones in queue order."""
        yield from self._admitted.values()
        yield from self._queue.values()

    def get(self, agent_id: str) -> Agent | None:
        return self._admitted.get(agent_id) or self._queue.get(agent_id)

    def view(self) -> GateView:
        live_state = AgentState.LIVE
        admitted = list(reversed(self._admitted.values()))
        live = [a for a in admitted if a.state is live_state]
        live_ctx = list(map(_context_tokens, live))
        if len(live) == len(admitted):
            candidates: list[int] = []
        else:
            candidates = [a.context_tokens for a in admitted if a.state is not live_state]
            candidates.reverse()
        candidates.extend(map(_context_tokens, self._queue_order()))
        return GateView(
            window=self.window,
            live=self._live,
            paused=self._paused,
            queued=len(self._queue),
            held=len(self._held),
            live_tokens=sum(live_ctx),
            live_contexts_newest_first=tuple(live_ctx),
            live_steps_newest_first=tuple(map(_requests, live)),
            candidate_contexts=tuple(candidates),
            pace=self.pace(),
        )

    def pace(self) -> Pace:
        """The request timing so far (the busy period in progress included)."""
        busy = self._busy_s
        if self._granted_now:
            busy += self._clock() - self._busy_from
        return Pace(
            busy,
            self._ended_requests,
            self._latency_s,
            self._tools,
            self._tool_s,
            self._served_tokens,
        )

    # ------------------------------------------------------------- requests

    def submit(
        self,
        agent_id: str,
        *,
        context_tokens: int = 0,
        priority: int = 0,
        done: bool = False,
        on_resolve: Callable[[Ticket], None] | None = None,
    ) -> Ticket:
        """Present one request of ``agent_id``; returns its ticket, granted or waiting.

        A waiting ticket is resolved later (granted or rejected) and then
        ``on_resolve`` is called. Raises :class:`QueueFull` when a new agent
        finds the queue full, :class:`GateClosed` after :meth:`close`.
        """
        now = self._clock()
        if self._closed:
            raise GateClosed("concur is shutting down; retry against another replica")
        ticket = Ticket(
            agent_id=agent_id,
            created_at=now,
            context_tokens=context_tokens,
            done=done,
            on_resolve=on_resolve,
        )
        agent = self._admitted.get(agent_id)
        if agent is not None:
            agent.last_seen = now
            if agent.last_done is not None:  # back from its tool call
                self._tools += 1
                self._tool_s += now - agent.last_done
                agent.last_done = None
            agent.context_tokens = max(agent.context_tokens, context_tokens)
            if agent.state is AgentState.PAUSED:
                agent.pending.append(ticket)
                return ticket
            return self._grant_or_hold(agent, ticket, now)
        agent = self._queue.get(agent_id)
        if agent is not None:
            agent.context_tokens = max(agent.context_tokens, context_tokens)
            ticket.new_agent = True
            agent.pending.append(ticket)
            return ticket
        ticket.new_agent = True
        agent = Agent(
            agent_id=agent_id,
            seq=next(self._seq),
            state=AgentState.QUEUED,
            since=now,
            last_seen=now,
            priority=priority,
            context_tokens=context_tokens,
        )
        if priority:
            self._prioritized = True
        if self._room() and not self._paused and not self._queue and self.admit_new:
            self._admit(agent, now)
            return self._grant_or_hold(agent, ticket, now)
        if self.max_queue_len is not None and len(self._queue) >= self.max_queue_len:
            self._emit("full", agent_id, now)
            err = QueueFull(
                f"admission queue is full ({self.max_queue_len} agents waiting); retry later"
            )
            err.retry_after = self._retry_hint()
            raise err
        agent.pending.append(ticket)
        self._queue[agent_id] = agent
        self._emit("queued", agent_id, now)
        return ticket

    def finish(self, ticket: Ticket) -> None:
        """The granted request is over (success, error or client gone). Idempotent."""
        if ticket.status is not TicketStatus.GRANTED:
            return
        ticket.status = TicketStatus.DONE
        now = self._clock()
        self._ungrant(ticket, now)
        if ticket.usage_tokens is not None:
            self._served_tokens += ticket.usage_tokens
        agent = self._counted_in(ticket)
        if agent is None:
            return
        agent.in_flight -= 1
        agent.requests += 1
        agent.last_seen = now
        if agent.in_flight == 0:
            agent.last_done = now
        if ticket.usage_tokens is not None:
            if self.observer is not None:
                self.observer.step_finished(agent, ticket.usage_tokens)
            agent.context_tokens = ticket.usage_tokens
        if ticket.done:
            agent.ending = True
        if agent.ending and agent.in_flight == 0 and not agent.pending:
            self._end(agent, now, "done")

    def abandon(self, ticket: Ticket) -> None:
        """The caller gave up on this ticket (timeout, disconnect, cancellation).

        A waiting ticket leaves no trace; a queued agent whose only request
        this was is removed. A ticket granted in the same instant is finished,
        and if it admitted its agent and nothing else happened, the agent is
        removed too, so a cancelled first request never holds a slot. A given-up
        last step (``done``) ends its agent as soon as nothing else of it is in
        flight or waiting, whatever state the step was in: the agent is over and
        must not hold (or resume into) a slot until ``admission.idle_timeout``.
        """
        now = self._clock()
        if ticket.status is TicketStatus.GRANTED:
            ticket.status = TicketStatus.CANCELLED
            self._ungrant(ticket, now)
            agent = self._counted_in(ticket)
            if agent is not None:
                agent.in_flight -= 1
                self._after_abandon(agent, ticket, now)
            return
        if ticket.status is not TicketStatus.WAITING:
            return
        ticket.status = TicketStatus.CANCELLED
        if ticket.held:
            self._held.remove(ticket)
            agent = self._counted_in(ticket)
            if agent is not None:
                agent.in_flight -= 1
                self._after_abandon(agent, ticket, now)
            return
        agent = self.get(ticket.agent_id)
        if agent is None:
            return
        agent.pending.remove(ticket)
        if agent.state is AgentState.QUEUED:
            if ticket.done:
                agent.ending = True
            if not agent.pending:
                del self._queue[agent.agent_id]
                self._emit("cancelled", agent.agent_id, now)
            return
        self._after_abandon(agent, ticket, now)

    def _after_abandon(self, agent: Agent, ticket: Ticket, now: float) -> None:
        """An admitted agent lost a request: end it if that leaves it with nothing to do
        and it never did anything (a cancelled first request) or it is over."""
        if ticket.done:
            agent.ending = True
        if agent.in_flight == 0 and not agent.pending and (agent.requests == 0 or agent.ending):
            self._end(agent, now, "cancelled" if agent.requests == 0 else "done")

    def end(self, agent_id: str, reason: str = "ended") -> bool:
        """End an agent now (admin call or caller's decision); False if unknown."""
        agent = self.get(agent_id)
        if agent is None:
            return False
        self._end(agent, self._clock(), reason)
        return True

    # --------------------------------------------------------------- control

    def apply(
        self,
        window: int | None,
        *,
        pause: bool = False,
        hold_requests: bool = False,
        release_limit: int | None = None,
        admit_new: bool = True,
    ) -> None:
        """Apply a policy decision: set the window, pause or release agents.

        With ``admit_new`` False no queued (new) agent is admitted, at this call or
        between calls, until a later one allows it; paused agents still resume.
        """
        now = self._clock()
        self.window = window
        self.hold_requests = hold_requests
        self.admit_new = admit_new
        if pause and window is not None and self._live > window:
            excess = self._live - window
            for agent in reversed(list(self._admitted.values())):
                if excess == 0:
                    break
                if agent.state is AgentState.LIVE:
                    agent.state = AgentState.PAUSED
                    agent.since = now
                    self._live -= 1
                    self._paused += 1
                    excess -= 1
                    self._emit("paused", agent.agent_id, now)
        self._fill(release_limit, now)
        if not hold_requests:
            while self._held:
                ticket = self._held.popleft()
                ticket.held = False
                owner = self._counted_in(ticket)
                if owner is not None and owner.state is AgentState.PAUSED:
                    # Paused meanwhile: it waits like its agent's other next steps.
                    owner.in_flight -= 1
                    owner.pending.append(ticket)
                    continue
                self._grant(ticket, now)
                self._emit("released", ticket.agent_id, now, ticket.waited)

    def reap(self) -> list[str]:
        """End admitted agents idle for ``idle_timeout``; returns their ids."""
        if self.idle_timeout is None:
            return []
        now = self._clock()
        idle = [
            a
            for a in self._admitted.values()
            if a.in_flight == 0 and not a.pending and now - a.last_seen >= self.idle_timeout
        ]
        for agent in idle:
            self._end(agent, now, "idle")
        return [a.agent_id for a in idle]

    def timed_out(self, ticket: Ticket) -> QueueTimeout:
        """The caller waited ``max_queue_wait`` for ``ticket`` and gives up: the ticket is
        abandoned and a ``timeout`` event emitted; returns the error to answer with."""
        self.abandon(ticket)
        now = self._clock()
        waited = now - ticket.created_at
        self._emit("timeout", ticket.agent_id, now, waited)
        return self._timeout_error(waited)

    def close(self) -> None:
        """Shut down: refuse new requests and reject everything still waiting."""
        self._closed = True
        waiting = [t for a in self.agents() for t in a.pending]
        waiting.extend(self._held)
        for ticket in waiting:
            self.abandon(ticket)
            self._reject(ticket, GateClosed("concur is shutting down; retry"))

    # -------------------------------------------------------------- internal

    def _room(self) -> bool:
        return self.window is None or self._live < self.window

    def _queue_order(self) -> list[Agent]:
        if not self._queue:
            return []
        # FIFO within a priority class; a higher class goes first. dict order is
        # arrival order, which is ``seq`` order: agents enter the queue once, when
        # created. So with a single priority class the order is the dict's.
        queued = list(self._queue.values())
        if len(set(map(_priority, queued))) == 1:
            return queued
        return sorted(queued, key=lambda a: (-a.priority, a.seq))

    def _fill(self, limit: int | None, now: float) -> None:
        released = 0
        while self._room() and (limit is None or released < limit):
            agent = self._next_candidate()
            if agent is None:
                break
            released += 1
            if agent.state is AgentState.PAUSED:
                paused_for = now - agent.since
                agent.state = AgentState.LIVE
                agent.since = now
                self._paused -= 1
                self._live += 1
                self._emit("resumed", agent.agent_id, now, paused_for)
            else:
                del self._queue[agent.agent_id]
                self._admit(agent, now)
            while agent.pending:
                self._grant_or_hold(agent, agent.pending.pop(0), now)

    def _next_candidate(self) -> Agent | None:
        if self._paused:  # in admission order, as paused agents are listed by view()
            return next(a for a in self._admitted.values() if a.state is AgentState.PAUSED)
        if not self._queue or not self.admit_new:
            return None
        if not self._prioritized or all(a.priority == 0 for a in self._queue.values()):
            return next(iter(self._queue.values()))
        return self._queue_order()[0]

    def _admit(self, agent: Agent, now: float) -> None:
        waited = now - agent.since
        agent.state = AgentState.LIVE
        agent.since = now
        agent.admitted_at = now
        agent.last_seen = now
        self._admitted[agent.agent_id] = agent
        self._live += 1
        self._emit("admitted", agent.agent_id, now, waited)

    def _counted_in(self, ticket: Ticket) -> Agent | None:
        """The admitted agent whose ``in_flight`` counts ``ticket``, if it is still admitted."""
        agent = ticket.agent
        return agent if self._admitted.get(ticket.agent_id) is agent else None

    def _grant_or_hold(self, agent: Agent, ticket: Ticket, now: float) -> Ticket:
        # in_flight counts held tickets too: an agent with a held request is not idle.
        agent.in_flight += 1
        ticket.agent = agent
        if self.hold_requests:
            ticket.held = True
            self._held.append(ticket)
            self._emit("held", agent.agent_id, now)
        else:
            self._grant(ticket, now)
        return ticket

    def _grant(self, ticket: Ticket, now: float) -> None:
        ticket.status = TicketStatus.GRANTED
        ticket.granted_at = now
        if not self._granted_now:
            self._busy_from = now
        self._granted_now += 1
        if ticket.on_resolve is not None:
            ticket.on_resolve(ticket)

    def _ungrant(self, ticket: Ticket, now: float) -> None:
        """A granted request ended (``ticket.granted_at`` is set): account its time."""
        self._granted_now -= 1
        if not self._granted_now:
            self._busy_s += now - self._busy_from
        self._ended_requests += 1
        assert ticket.granted_at is not None
        self._latency_s += now - ticket.granted_at

    def _reject(self, ticket: Ticket, error: AdmissionError) -> None:
        ticket.status = TicketStatus.REJECTED
        ticket.error = error
        if ticket.on_resolve is not None:
            ticket.on_resolve(ticket)

    def _end(self, agent: Agent, now: float, reason: str) -> None:
        if agent.state is AgentState.QUEUED:
            self._queue.pop(agent.agent_id, None)
        else:
            if self._admitted.pop(agent.agent_id, None) is None:
                return
            if agent.state is AgentState.LIVE:
                self._live -= 1
            else:
                self._paused -= 1
            if self.observer is not None:
                self.observer.agent_ended(agent, reason)
        pending = list(agent.pending)
        agent.pending.clear()
        held = [t for t in self._held if t.agent_id == agent.agent_id]
        for ticket in held:
            self._held.remove(ticket)
        for ticket in [*pending, *held]:
            self._reject(ticket, AgentEnded(f"agent {agent.agent_id!r} was ended ({reason})"))
        self._emit("ended", agent.agent_id, now, detail=reason)
        if agent.state is not AgentState.QUEUED:
            self._fill(1, now)

    def _retry_hint(self) -> float:
        return float(self.max_queue_wait) if self.max_queue_wait else 1.0

    def _timeout_error(self, waited: float) -> QueueTimeout:
        err = QueueTimeout(
            f"waited {waited:.1f}s for an agent slot (max_queue_wait); the engine is at capacity, "
            "retry later"
        )
        err.retry_after = self._retry_hint()
        return err

    def _emit(
        self, kind: str, agent_id: str, at: float, waited: float | None = None, detail: str = ""
    ) -> None:
        if self.on_event is not None:
            self.on_event(GateEvent(kind, agent_id, at, waited, detail))
