"""The admitted agents: live or paused, in admission order, with their counts."""

from __future__ import annotations

from collections.abc import Iterator

from concur._gate_model import Agent, AgentState, Ticket
from concur._idle import IdleRule


class AgentTable:
    """Admitted agents by id, in admission order; ``live`` and ``paused`` count them."""

    __slots__ = ("_agents", "live", "paused")

    def __init__(self) -> None:
        self._agents: dict[str, Agent] = {}
        self.live = 0
        self.paused = 0

    def __iter__(self) -> Iterator[Agent]:
        return iter(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)

    def newest_first(self) -> list[Agent]:
        return list(reversed(self._agents.values()))

    def get(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    def owner(self, ticket: Ticket) -> Agent | None:
        """The admitted agent whose ``in_flight`` counts ``ticket``, if still admitted: an
        agent ended and admitted again under the same id is a new row."""
        agent = ticket.agent
        return agent if self._agents.get(ticket.agent_id) is agent else None

    def admit(self, agent: Agent, now: float) -> float:
        """``agent`` goes live now; returns how long it waited."""
        waited = now - agent.since
        agent.state = AgentState.LIVE
        agent.since = agent.admitted_at = agent.last_seen = now
        self._agents[agent.agent_id] = agent
        self.live += 1
        return waited

    def pause_newest(self, count: int, now: float) -> list[Agent]:
        """Pause the ``count`` most recently admitted live agents; returns them."""
        paused: list[Agent] = []
        for agent in reversed(self._agents.values()):
            if len(paused) == count:
                break
            if agent.state is AgentState.LIVE:
                agent.state = AgentState.PAUSED
                agent.since = now
                paused.append(agent)
        self.live -= len(paused)
        self.paused += len(paused)
        return paused

    def first_paused(self) -> Agent | None:
        """The paused agent admitted first (the next to resume)."""
        if not self.paused:
            return None
        return next(a for a in self._agents.values() if a.state is AgentState.PAUSED)

    def resume(self, agent: Agent, now: float) -> float:
        """A paused ``agent`` goes live now; returns how long it was paused."""
        paused_for = now - agent.since
        agent.state = AgentState.LIVE
        agent.since = now
        self.paused -= 1
        self.live += 1
        return paused_for

    def remove(self, agent: Agent) -> bool:
        """``agent`` leaves the table; False if it was not in it."""
        if self._agents.pop(agent.agent_id, None) is None:
            return False
        if agent.state is AgentState.LIVE:
            self.live -= 1
        else:
            self.paused -= 1
        return True

    def over(self, rule: IdleRule, now: float) -> list[tuple[Agent, str]]:
        """Agents with nothing in flight or waiting that ``rule`` says are over, and why."""
        return [
            (a, why)
            for a in self._agents.values()
            if a.in_flight == 0 and not a.pending and (why := rule.gone(a, now)) is not None
        ]
