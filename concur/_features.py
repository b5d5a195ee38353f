"""What the controller derives from the gate for a policy, tick by tick.

The gate keeps facts: its agent table, window and queue, and the cumulative timing
of requests (:class:`~concur.admission.Pace`). The features a policy reads that are
*learned* or *per interval* are made here, on the policy side of the gate:

* :class:`GrowthFeatures` learns how much an agent's context grows per step and how
  many steps agents take (a :class:`~concur.policies.growth.GrowthEstimator` fed
  through the gate's :class:`~concur.admission.GateObserver`), and projects the
  live agents' further growth;
* :class:`PaceFeatures` turns the gate's cumulative :class:`~concur.admission.Pace`
  into the interval's busy share, completions, latency and tool time.

Both are pure and clock-free: time comes in with each call, as in the policies.
"""

from __future__ import annotations

from dataclasses import dataclass

from concur.admission import Agent, GateView, Pace
from concur.policies.growth import GrowthEstimator

_LEARNED_FROM = frozenset({"done", "idle"})
"""Ends that tell how long agents run (not how they are cut short: deleted, cancelled)."""


class GrowthFeatures:
    """An observation's ``growth_tokens``, learned online.

    Growth is measured between consecutive responses of one agent: the context its
    engine reported (``usage``) after a step minus the one after its previous step.
    """

    __slots__ = ("_last_usage", "estimator")

    def __init__(self) -> None:
        self.estimator = GrowthEstimator()
        self._last_usage: dict[Agent, int] = {}
        """Each admitted agent's context after its previous response (by row: an agent
        ended and admitted again under the same id starts afresh)."""

    # GateObserver

    def step_finished(self, agent: Agent, usage_tokens: int) -> None:
        last = self._last_usage.get(agent)
        if last is not None:
            self.estimator.observe_step(usage_tokens - last, agent.requests)
        self._last_usage[agent] = usage_tokens

    def agent_ended(self, agent: Agent, reason: str) -> None:
        self._last_usage.pop(agent, None)
        if reason in _LEARNED_FROM:
            self.estimator.observe_end(agent.requests)

    # features

    def project(self, view: GateView) -> float:
        """The expected further growth of the live agents' contexts."""
        estimator = self.estimator
        growth = 0.0
        if estimator.growth_per_step:  # else every agent's remaining growth is 0.0
            for steps in view.live_steps_newest_first:
                growth += estimator.remaining_growth(steps)
        return growth


@dataclass(frozen=True, slots=True)
class Interval:
    """The gate's request timing over one interval between ticks."""

    span: float
    """Seconds since the previous tick (0.0 at the first)."""
    busy: float | None
    completed: int
    latency_s: float | None
    tool_s: float | None
    served_tokens: int


class PaceFeatures:
    """Differences of the gate's cumulative :class:`Pace` between two ticks."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[float, Pace] | None = None

    def interval(self, now: float, pace: Pace) -> Interval:
        """The interval from the previous call to ``now`` (call it once per tick)."""
        then, last = self._last or (now, pace)  # the first tick has no interval behind it
        self._last = (now, pace)
        span = now - then
        ended = pace.requests - last.requests
        tools = pace.tools - last.tools
        return Interval(
            span=span,
            busy=min(1.0, (pace.busy_s - last.busy_s) / span) if span > 0 else None,
            completed=ended,
            latency_s=(pace.latency_s - last.latency_s) / ended if ended else None,
            tool_s=(pace.tool_s - last.tool_s) / tools if tools else None,
            served_tokens=pace.served_tokens - last.served_tokens,
        )
