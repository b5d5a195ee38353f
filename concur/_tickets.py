"""The gate's ticket desk: granting, refusing and holding requests, and their timing.

:class:`TicketDesk` resolves tickets (granted, or rejected with an error) and calls
their ``on_resolve``; it keeps the requests held by request-level gating (``epp``) and
the :class:`~concur._pace.PaceMeter` that times granted requests. Which ticket is
granted when is the gate's call (:mod:`concur.admission`); how is this module's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from concur._gate_model import AdmissionError, Agent, Ticket, TicketStatus
from concur._pace import PaceMeter


class TicketDesk:
    """Resolves tickets, holds the ones request-level gating holds, times granted ones."""

    __slots__ = ("_held", "pace")

    def __init__(self) -> None:
        self._held: deque[Ticket] = deque()
        self.pace = PaceMeter()

    # ------------------------------------------------------------- resolving

    def grant(self, ticket: Ticket, now: float) -> None:
        ticket.status = TicketStatus.GRANTED
        ticket.granted_at = now
        self.pace.granted(now)
        if ticket.on_resolve is not None:
            ticket.on_resolve(ticket)

    def ungrant(self, ticket: Ticket, now: float) -> None:
        """A granted request ended (``ticket.granted_at`` is set): account its time."""
        assert ticket.granted_at is not None
        self.pace.ended(ticket.granted_at, now)

    @staticmethod
    def reject(ticket: Ticket, error: AdmissionError) -> None:
        ticket.status = TicketStatus.REJECTED
        ticket.error = error
        if ticket.on_resolve is not None:
            ticket.on_resolve(ticket)

    # --------------------------------------------------------------- holding

    def hold(self, ticket: Ticket) -> None:
        ticket.held = True
        self._held.append(ticket)

    def unhold(self, ticket: Ticket) -> None:
        """Take one held ticket out (its caller gave up on it)."""
        self._held.remove(ticket)

    def next_held(self) -> Ticket | None:
        """The oldest held ticket, no longer held; None when none is."""
        if not self._held:
            return None
        ticket = self._held.popleft()
        ticket.held = False
        return ticket

    def take_held(self, agent_id: str) -> list[Ticket]:
        """Take out every held ticket of ``agent_id`` (its agent ended)."""
        mine = [t for t in self._held if t.agent_id == agent_id]
        for ticket in mine:
            self._held.remove(ticket)
        return mine

    def holds(self, agent: Agent) -> bool:
        """Whether a request of ``agent`` is held."""
        return any(t.agent is agent for t in self._held)

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Ticket]:
        """The held tickets, oldest first."""
        return iter(self._held)
