"""The admission queue: new agents waiting for a slot, FIFO within a priority class."""

from __future__ import annotations

import operator
from collections.abc import Iterator

from concur._gate_model import Agent

_priority = operator.attrgetter("priority")


class AgentQueue:
    """Queued agents by id, in arrival order; a higher priority class goes first."""

    __slots__ = ("_agents", "_prioritized")

    def __init__(self) -> None:
        self._agents: dict[str, Agent] = {}
        # Whether any agent ever came with a priority other than 0. Until one does the
        # queue is plain FIFO, and picking the next agent must not scan it (O(n) per
        # admission made admitting hundreds from a queue of thousands take 0.2 s).
        self._prioritized = False

    def __len__(self) -> int:
        return len(self._agents)

    def __bool__(self) -> bool:
        return bool(self._agents)

    def __iter__(self) -> Iterator[Agent]:
        """In arrival order (not priority order: see :meth:`order`)."""
        return iter(self._agents.values())

    def get(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    def add(self, agent: Agent) -> None:
        if agent.priority:
            self._prioritized = True
        self._agents[agent.agent_id] = agent

    def remove(self, agent_id: str) -> Agent | None:
        return self._agents.pop(agent_id, None)

    def order(self) -> list[Agent]:
        """Everyone, next to be admitted first."""
        if not self._agents:
            return []
        # dict order is arrival order, which is ``seq`` order: agents enter the queue
        # once, when created. So with a single priority class the order is the dict's.
        queued = list(self._agents.values())
        if len(set(map(_priority, queued))) == 1:
            return queued
        return sorted(queued, key=lambda a: (-a.priority, a.seq))

    def first(self) -> Agent | None:
        """The next to be admitted, if any."""
        if not self._agents:
            return None
        if not self._prioritized or all(a.priority == 0 for a in self._agents.values()):
            return next(iter(self._agents.values()))
        return self.order()[0]

    def position(self, agent: Agent) -> int:
        """How many queued agents go before ``agent``."""
        return next((i for i, a in enumerate(self.order()) if a is agent), len(self._agents))
