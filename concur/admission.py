"""The admission gate: which agents may run now, and who waits.

One gate serves the proxy (on ``time.monotonic``) and the simulator (on a
virtual clock). It is synchronous and sans-IO: :meth:`AdmissionGate.submit`
returns a :class:`Ticket` that is granted at once or later, through a callback.
The proxy waits for it with a :class:`concur.Permit` (``concur._admit``), the
simulator schedules on the callback. What the policy side learns from the agents'
progress (their context growth, see ``concur._features``) it learns through a
:class:`GateObserver`; the gate itself keeps the agent table, the window, the queue
(``concur._agent_queue``); tickets are granted, refused and held, and granted
requests timed (:class:`Pace`), by ``concur._tickets``. Its records are in
``concur._gate_model``; when an idle agent counts as gone is
:class:`~concur._idle.IdleRule`'s call, why a waiting one waits ``concur._waits``'.

Agents move through three states (:class:`AgentState`): queued, live, paused. The
window bounds live agents. Accounting is exact on every path: once all
agents end, ``active == 0`` and ``queued == 0``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from concur._agent_queue import AgentQueue
from concur._agent_table import AgentTable
from concur._gate_model import (
    AdmissionError,
    Agent,
    AgentEnded,
    AgentState,
    GateClosed,
    GateEvent,
    GateObserver,
    GateView,
    Pace,
    QueueFull,
    QueueTimeout,
    Ticket,
    TicketStatus,
)
from concur._gate_views import GateViews
from concur._idle import IdleRule
from concur._tickets import TicketDesk
from concur._waits import WaitReason, held, queue_full, queue_timeout, why_queued

__all__ = [
    "AdmissionError",
    "AdmissionGate",
    "Agent",
    "AgentEnded",
    "AgentState",
    "Clock",
    "GateClosed",
    "GateEvent",
    "GateObserver",
    "GateView",
    "IdleRule",
    "Pace",
    "QueueFull",
    "QueueTimeout",
    "Ticket",
    "TicketStatus",
    "WaitReason",
]

Clock = Callable[[], float]


class AdmissionGate(GateViews):
    """Agent table, window, FIFO queue and idle reaper; time comes from ``clock``.

    ``idle_timeout`` alone is a fixed idle timeout; ``idle`` (an :class:`IdleRule`) an
    adaptive one, and the grace after a client hangs up (see :meth:`reap`).
    """

    def __init__(
        self,
        *,
        clock: Clock,
        window: int | None = None,
        max_queue_len: int | None = None,
        max_queue_wait: float | None = None,
        idle_timeout: float | None = None,
        idle: IdleRule | None = None,
        retry_after: float = 1.0,
        on_event: Callable[[GateEvent], None] | None = None,
    ) -> None:
        self._clock = clock
        self.window = window
        self.max_queue_len = max_queue_len
        self.max_queue_wait = max_queue_wait
        if idle is None and idle_timeout is not None:
            idle = IdleRule(idle_timeout)
        self.idle = idle
        """When an idle admitted agent is over (None: never, until it ends)."""
        self.retry_after = retry_after
        """Seconds a refused client is told to wait before it retries (``Retry-After``)."""
        self.on_event = on_event
        self.hold_requests = False
        self.admit_new = True
        """False: queued agents wait whatever the window (see :meth:`apply`)."""
        self.reason = ""
        """The last decision's reason (``stale:<mode>`` on a stale engine signal): part
        of what a waiting agent is told (``concur._waits``)."""
        self.observer: GateObserver | None = None
        """Told of finished steps and ended agents (set by the policy side's features)."""
        self._seq = itertools.count()
        self._admitted = AgentTable()
        self._queue = AgentQueue()
        self._desk = TicketDesk()
        self._closed = False

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
            pause = agent.back_from_tool(now)
            if pause is not None:
                self._desk.pace.tool_returned(pause)
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
        if self._room() and not self._admitted.paused and not self._queue and self.admit_new:
            self._admit(agent, now)
            return self._grant_or_hold(agent, ticket, now)
        if self.max_queue_len is not None and len(self._queue) >= self.max_queue_len:
            self._emit("full", agent_id, now)
            raise queue_full(self, self.max_queue_len)
        agent.pending.append(ticket)
        self._queue.add(agent)
        self._emit("queued", agent_id, now, detail=why_queued(self).code)
        return ticket

    def finish(self, ticket: Ticket) -> None:
        """The granted request is over (success, error or client gone). Idempotent.

        With ``ticket.client_gone`` set, the client hung up before the response ended:
        its agent is over after the idle rule's ``disconnect_grace`` unless it sends again.
        """
        if ticket.status is not TicketStatus.GRANTED:
            return
        ticket.status = TicketStatus.DONE
        now = self._clock()
        self._desk.ungrant(ticket, now)
        if ticket.usage_tokens is not None:
            self._desk.pace.served(ticket.usage_tokens)
        agent = self._admitted.owner(ticket)
        if agent is None:
            return
        agent.in_flight -= 1
        agent.requests += 1
        agent.last_seen = now
        if ticket.client_gone:
            self._hung_up(agent, now)
        else:
            agent.gone_at = None
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

    def abandon(self, ticket: Ticket, *, client_gone: bool = True) -> None:
        """The caller gave up on this ticket (disconnect, cancellation, timeout).

        A waiting ticket leaves no trace; a queued agent whose only request
        this was is removed. A ticket granted in the same instant is finished,
        and if it admitted its agent and nothing else happened, the agent is
        removed too, so a cancelled first request never holds a slot. A given-up
        last step (``done``) ends its agent as soon as nothing else of it is in
        flight or waiting, whatever state the step was in: the agent is over and
        must not hold (or resume into) a slot until its idle timeout. With
        ``client_gone`` (the default: the client hung up) an admitted agent's
        disconnect grace starts, as in :meth:`finish`.
        """
        now = self._clock()
        if ticket.status is TicketStatus.GRANTED:
            ticket.status = TicketStatus.CANCELLED
            self._desk.ungrant(ticket, now)
            agent = self._admitted.owner(ticket)
            if agent is not None:
                agent.in_flight -= 1
                self._after_abandon(agent, ticket, now, client_gone)
            return
        if ticket.status is not TicketStatus.WAITING:
            return
        ticket.status = TicketStatus.CANCELLED
        if ticket.held:
            self._desk.unhold(ticket)
            agent = self._admitted.owner(ticket)
            if agent is not None:
                agent.in_flight -= 1
                self._after_abandon(agent, ticket, now, client_gone)
            return
        agent = self.get(ticket.agent_id)
        if agent is None:
            return
        agent.pending.remove(ticket)
        if agent.state is AgentState.QUEUED:
            if ticket.done:
                agent.ending = True
            if not agent.pending:
                self._queue.remove(agent.agent_id)
                self._emit("cancelled", agent.agent_id, now)
            return
        self._after_abandon(agent, ticket, now, client_gone)

    def _after_abandon(self, agent: Agent, ticket: Ticket, now: float, client_gone: bool) -> None:
        """An admitted agent lost a request: end it if that leaves it with nothing to do
        and it never did anything (a cancelled first request) or it is over."""
        if ticket.done:
            agent.ending = True
        if agent.in_flight == 0 and not agent.pending and (agent.requests == 0 or agent.ending):
            self._end(agent, now, "cancelled" if agent.requests == 0 else "done")
        elif client_gone:
            self._hung_up(agent, now)

    def _hung_up(self, agent: Agent, now: float) -> None:
        if agent.gone_at is None:
            agent.gone_at = now
            self._emit("gone", agent.agent_id, now)

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
        reason: str = "",
    ) -> None:
        """Apply a policy decision: set the window, pause or release agents.

        With ``admit_new`` False no queued (new) agent is admitted, at this call or
        between calls, until a later one allows it; paused agents still resume.
        ``reason`` is the decision's, for what waiting agents are told.
        """
        now = self._clock()
        self.window = window
        self.hold_requests = hold_requests
        self.admit_new = admit_new
        self.reason = reason
        if pause and window is not None and self._admitted.live > window:
            for agent in self._admitted.pause_newest(self._admitted.live - window, now):
                self._emit("paused", agent.agent_id, now)
        self._fill(release_limit, now)
        if not hold_requests:
            while (ticket := self._desk.next_held()) is not None:
                owner = self._admitted.owner(ticket)
                if owner is not None and owner.state is AgentState.PAUSED:
                    # Paused meanwhile: it waits like its agent's other next steps.
                    owner.in_flight -= 1
                    owner.pending.append(ticket)
                    continue
                self._desk.grant(ticket, now)
                self._emit("released", ticket.agent_id, now, ticket.waited)

    def reap(self) -> list[str]:
        """End admitted agents that are over though they never said so; returns their ids.

        With nothing in flight or waiting, an agent is over when its client hung up
        ``disconnect_grace`` ago, or when it has been idle longer than its idle timeout
        (:class:`IdleRule`); the ``ended`` event says which (``gone`` or ``idle``).
        """
        rule = self.idle
        if rule is None:
            return []
        now = self._clock()
        over = self._admitted.over(rule, now)
        for agent, why in over:
            self._end(agent, now, why)
        return [a.agent_id for a, _ in over]

    def timed_out(self, ticket: Ticket) -> QueueTimeout:
        """The caller waited ``max_queue_wait`` for ``ticket`` and gives up: the ticket is
        abandoned and a ``timeout`` event emitted; returns the error to answer with,
        which says why it waited."""
        agent = ticket.agent if ticket.held else self.get(ticket.agent_id)
        why = held(self) if ticket.held else None
        if why is None and agent is not None:
            why = self.waiting_for(agent)
        self.abandon(ticket, client_gone=False)
        now = self._clock()
        waited = now - ticket.created_at
        self._emit("timeout", ticket.agent_id, now, waited, why.code if why else "")
        return queue_timeout(self, waited, why, new_agent=ticket.new_agent and not ticket.held)

    def close(self) -> None:
        """Shut down: refuse new requests and reject everything still waiting."""
        self._closed = True
        waiting = [t for a in self.agents() for t in a.pending]
        waiting.extend(self._desk)
        for ticket in waiting:
            self.abandon(ticket, client_gone=False)
            self._desk.reject(ticket, GateClosed("concur is shutting down; retry"))

    # -------------------------------------------------------------- internal

    def _room(self) -> bool:
        return self.window is None or self._admitted.live < self.window

    def _fill(self, limit: int | None, now: float) -> None:
        released = 0
        while self._room() and (limit is None or released < limit):
            agent = self._next_candidate()
            if agent is None:
                break
            released += 1
            if agent.state is AgentState.PAUSED:
                self._emit("resumed", agent.agent_id, now, self._admitted.resume(agent, now))
            else:
                self._queue.remove(agent.agent_id)
                self._admit(agent, now)
            while agent.pending:
                self._grant_or_hold(agent, agent.pending.pop(0), now)

    def _next_candidate(self) -> Agent | None:
        paused = self._admitted.first_paused()  # in admission order, as view() lists them
        if paused is not None:
            return paused
        if not self.admit_new:
            return None
        return self._queue.first()

    def _admit(self, agent: Agent, now: float) -> None:
        self._emit("admitted", agent.agent_id, now, self._admitted.admit(agent, now))

    def _grant_or_hold(self, agent: Agent, ticket: Ticket, now: float) -> Ticket:
        # in_flight counts held tickets too: an agent with a held request is not idle.
        agent.in_flight += 1
        ticket.agent = agent
        if self.hold_requests:
            self._desk.hold(ticket)
            self._emit("held", agent.agent_id, now)
        else:
            self._desk.grant(ticket, now)
        return ticket

    def _end(self, agent: Agent, now: float, reason: str) -> None:
        if agent.state is AgentState.QUEUED:
            self._queue.remove(agent.agent_id)
        else:
            if not self._admitted.remove(agent):
                return
            if self.observer is not None:
                self.observer.agent_ended(agent, reason)
        pending = list(agent.pending)
        agent.pending.clear()
        for ticket in [*pending, *self._desk.take_held(agent.agent_id)]:
            self._desk.reject(ticket, AgentEnded(f"agent {agent.agent_id!r} was ended ({reason})"))
        self._emit("ended", agent.agent_id, now, detail=reason)
        if agent.state is not AgentState.QUEUED:
            self._fill(1, now)

    def _emit(
        self, kind: str, agent_id: str, at: float, waited: float | None = None, detail: str = ""
    ) -> None:
        if self.on_event is not None:
            self.on_event(GateEvent(kind, agent_id, at, waited, detail))
