"""When an admitted agent counts as gone: a pure rule, time passed in.

An agent holds its slot between requests (its tool calls), so the gate must tell a
long tool call from an agent that will never come back: a crashed harness, a killed
rollout worker, a one-off request. Two facts tell it without the agent's help:

* **its own pauses**: an agent idle far longer than any pause it has shown is gone.
  Its timeout is ``factor`` x its longest pause so far, within
  [``shortest``, ``longest``]; an agent that has not come back once yet (a one-off
  request looks like that) gets ``first``;
* **its client hung up**: a request whose client closed the connection before the
  response ended leaves its agent gone after ``disconnect_grace`` seconds, unless it
  sends again (or another of its responses is read to the end) meanwhile.

``longest`` caps everything: with it alone (``factor`` 0) the timeout is fixed, as
``admission.idle_timeout`` used to be.
"""

from __future__ import annotations

from dataclasses import dataclass

from concur._gate_model import Agent


@dataclass(frozen=True, slots=True)
class IdleRule:
    """How long an admitted agent with nothing in flight keeps its slot."""

    longest: float
    """The most any agent keeps its slot idle (``admission.idle_timeout``)."""
    shortest: float = 0.0
    """The least an agent that has paused before keeps it (``admission.idle_timeout_min``)."""
    factor: float = 0.0
    """Multiple of its longest pause (``admission.idle_pause_factor``); 0: fixed timeout."""
    first: float | None = None
    """Before its first pause (``admission.idle_timeout_new``); None: ``longest``."""
    disconnect_grace: float | None = None
    """Seconds a hung-up agent keeps its slot (``admission.disconnect_grace``); None:
    a hang-up alone ends nothing."""

    def timeout(self, longest_pause: float | None) -> float:
        """The idle timeout of an agent whose longest pause so far is ``longest_pause``."""
        cap = self.longest
        if not self.factor:
            return cap
        if longest_pause is None:
            return cap if self.first is None else min(cap, max(self.first, 0.0))
        return min(cap, max(self.shortest, self.factor * longest_pause))

    def gone(self, agent: Agent, now: float) -> str | None:
        """Why ``agent`` (nothing in flight, nothing waiting) is over at ``now``: ``"gone"``
        (its client hung up), ``"idle"``, or None while it keeps its slot."""
        grace = self.disconnect_grace
        if grace is not None and agent.gone_at is not None and now - agent.gone_at >= grace:
            return "gone"
        if now - agent.last_seen >= self.timeout(agent.longest_pause):
            return "idle"
        return None
