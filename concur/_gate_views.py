"""The admission gate's read side: counts, agent rows, why they wait, snapshots.

:class:`GateViews` is the part of :class:`~concur.admission.AdmissionGate` that only
reads its state (the gate sets it): what status pages, the policy's observation and
the tests look at. The gate itself, in :mod:`concur.admission`, changes it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

from concur._agent_queue import AgentQueue
from concur._agent_table import AgentTable
from concur._gate_model import Agent, AgentState, GateView, Pace
from concur._idle import IdleRule
from concur._tickets import TicketDesk
from concur._waits import WaitReason, why_queued, why_waiting

_context_tokens = operator.attrgetter("context_tokens")
_requests = operator.attrgetter("requests")


class GateViews:
    """Read-only views of an admission gate's state."""

    window: int | None
    retry_after: float
    admit_new: bool
    reason: str
    idle: IdleRule | None
    _clock: Callable[[], float]
    _admitted: AgentTable
    _queue: AgentQueue
    _desk: TicketDesk

    @property
    def idle_timeout(self) -> float | None:
        """The longest any idle agent keeps its slot (None: no idle timeout)."""
        return None if self.idle is None else self.idle.longest

    @property
    def live(self) -> int:
        return self._admitted.live

    @property
    def paused(self) -> int:
        return self._admitted.paused

    @property
    def active(self) -> int:
        return self._admitted.live + self._admitted.paused

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held(self) -> int:
        return len(self._desk)

    def agents(self) -> Iterator[Agent]:
        """Admitted agents in admission order, then queued ones in queue order."""
        yield from self._admitted
        yield from self._queue

    def get(self, agent_id: str) -> Agent | None:
        return self._admitted.get(agent_id) or self._queue.get(agent_id)

    def holds(self, agent: Agent) -> bool:
        """Whether a request of ``agent`` is held by request-level gating."""
        return self._desk.holds(agent)

    def waiting_for(self, agent: Agent) -> WaitReason | None:
        """Why ``agent`` (or a request of it) waits now; None when nothing of it waits."""
        return why_waiting(self, agent)

    def queue_reason(self) -> WaitReason | None:
        """Why new agents wait now; None when none does."""
        return why_queued(self) if self._queue else None

    def idle_limit(self, agent: Agent) -> float | None:
        """How long ``agent`` may stay idle now before its slot is freed (None: no limit)."""
        return None if self.idle is None else self.idle.timeout(agent.longest_pause)

    def view(self) -> GateView:
        live_state = AgentState.LIVE
        admitted = self._admitted.newest_first()
        live = [a for a in admitted if a.state is live_state]
        live_ctx = list(map(_context_tokens, live))
        draining = 0
        if len(live) == len(admitted):
            candidates: list[int] = []
        else:
            waiting = [a for a in admitted if a.state is not live_state]
            draining = sum(1 for a in waiting if a.in_flight)
            candidates = [a.context_tokens for a in reversed(waiting)]
        candidates.extend(map(_context_tokens, self._queue.order()))
        return GateView(
            window=self.window,
            live=self._admitted.live,
            paused=self._admitted.paused,
            queued=len(self._queue),
            held=len(self._desk),
            live_tokens=sum(live_ctx),
            live_contexts_newest_first=tuple(live_ctx),
            live_steps_newest_first=tuple(map(_requests, live)),
            candidate_contexts=tuple(candidates),
            pace=self.pace(),
            draining=draining,
        )

    def pace(self) -> Pace:
        """The request timing so far (the busy period in progress included)."""
        return self._desk.pace.snapshot(self._clock())
