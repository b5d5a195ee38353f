"""Whether the engine is the bottleneck: its busy share, the agents' pace, and the mode.

Thrashing the prefix cache costs throughput only when the engine has no time to
spare for the recomputation. When the live agents' working set is as large as
the cache can hold and the engine still sits idle for a good part of the time
(the agents spend most of theirs in tool calls), holding the other agents back
idles the engine: more agents, even missing the cache, get more done. When the
engine is busy anyway, every recomputed prefix is time taken from useful work,
and keeping the working set resident pays.

:class:`EngineLoad` averages, over about one agent cycle (a request and the tool
call after it), the engine's busy share (the fraction of time at least one of the
agents' requests was in flight: the gate measures it, so any engine, real or
simulated, has it) and the rate at which requests complete, and decides between
two modes:

``resident``
    the window keeps the live working set in the cache (and pauses agents to do so);
``open``
    no limit and nobody paused: cache misses are cheaper than an idle engine.

It opens when agents are held back while the engine stays under ``busy_low`` for
``dwell_cycles`` agent cycles. Open, it keeps the mode only if it pays: after the
same settling time, if requests complete more slowly than they did resident, it
closes again and waits twice as long before the next try. After ``reprobe_s``
open, if the cache is congested, it closes to check that the swarm has not
changed. Pure: time comes in with each update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["EngineLoad", "Ewma", "Mode"]


class Mode(StrEnum):
    RESIDENT = "resident"
    OPEN = "open"


@dataclass(slots=True)
class Ewma:
    """An exponentially weighted average over time (``None`` until a first sample)."""

    value: float | None = None

    def add(self, sample: float, dt: float, tau: float) -> float:
        if self.value is None:
            self.value = sample
        else:
            self.value += (1.0 - math.exp(-dt / tau)) * (sample - self.value)
        return self.value


@dataclass(slots=True)
class EngineLoad:
    """The agents' pace, the engine's busy share and the mode they imply."""

    busy_low: float
    dwell_cycles: float
    min_dwell_s: float
    reprobe_s: float
    mode: Mode = Mode.RESIDENT
    since: float = 0.0
    """When the current mode began."""
    busy: Ewma | None = None
    rate: Ewma | None = None
    """Requests completed per second, in the current mode."""
    cycle: Ewma | None = None
    """An agent's cycle: its request's time plus its tool call's."""
    idle_since: float | None = None
    """Since when, resident, agents have waited while the engine stayed under ``busy_low``."""
    resident_rate: float | None = None
    """The completion rate resident, when it last opened."""
    backoff: float = 1.0
    """Multiplies the dwell before opening: doubled by every failed try."""
    judged: bool = False
    """Open: whether it was compared with resident yet (once, after the dwell)."""

    def __post_init__(self) -> None:
        self.busy, self.rate, self.cycle = Ewma(), Ewma(), Ewma()

    def dwell(self) -> float:
        """Seconds to wait before judging: ``dwell_cycles`` agent cycles, at least
        ``min_dwell_s``."""
        assert self.cycle is not None
        cycle = self.cycle.value or 0.0
        return max(self.min_dwell_s, self.dwell_cycles * cycle)

    def update(
        self,
        interval_s: float | None,
        busy: float | None,
        completed: int,
        latency_s: float | None,
        tool_s: float | None,
    ) -> None:
        """Fold one tick's interval in (nothing when the interval or the busy share is
        unknown: the first tick, or a gate that does not measure its pace)."""
        assert self.busy is not None and self.rate is not None and self.cycle is not None
        if not interval_s or busy is None:
            return
        if latency_s is not None and tool_s is not None:
            self.cycle.add(latency_s + tool_s, interval_s, max(1.0, self.cycle.value or 1.0))
        tau = max(1.0, self.cycle.value or 1.0)
        self.busy.add(busy, interval_s, tau)
        self.rate.add(completed / interval_s, interval_s, tau)

    def step(self, now: float, held_back: bool, congested: bool) -> Mode:
        """The mode for this tick. ``held_back``: agents wait (queued or paused);
        ``congested``: the cache is over its threshold."""
        assert self.busy is not None and self.rate is not None
        if self.mode is Mode.OPEN:
            if not self.judged and now - self.since >= self.dwell():
                self.judged = True
                rate, before = self.rate.value, self.resident_rate
                if rate is not None and before is not None and rate < before:
                    self.backoff *= 2.0  # it did not pay: try again later, if at all
                    self._switch(Mode.RESIDENT, now)
            elif self.judged and congested and now - self.since >= self.reprobe_s:
                self._switch(Mode.RESIDENT, now)
            return self.mode
        idle = self.busy.value is not None and self.busy.value < self.busy_low
        if not (held_back and idle):
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        if self.idle_since is not None and now - self.idle_since >= self.dwell() * self.backoff:
            self.resident_rate = self.rate.value
            self._switch(Mode.OPEN, now)
        return self.mode

    def _switch(self, mode: Mode, now: float) -> None:
        self.mode = mode
        self.since = now
        self.idle_since = None
        self.judged = False
        # The other mode's load and pace say nothing about this one.
        self.busy, self.rate = Ewma(), Ewma()
