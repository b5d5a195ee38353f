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
simulated, has it), keeps the recent work done (context tokens served), and decides
between two modes:

``resident``
    the window keeps the live working set in the cache (and pauses agents to do so);
``open``
    no limit and nobody paused: cache misses are cheaper than an idle engine.

It starts open (``start_open``): until the agents show that they wait on the engine,
nothing says the engine is the bottleneck, and an agent held back at the start is late
for its whole life. Open, it closes when the cache is congested and the agents spend
more than ``share_high`` of their cycle waiting on the engine (their requests' time over
request plus tool call, averaged over a cycle) for a whole agent cycle: the engine is then
the bottleneck, and every prefix it recomputes is taken from useful work. The first reading
of the share is itself one whole cycle of the agents that report it, so when it is already
over ``share_high`` the cycle has been seen: a swarm that overflows the cache from its
first step (every agent queued behind one prefill backlog) closes at its first reading,
while a start burst that clears quickly reads low and stays open.

Resident, it opens when agents are held back (or the cache is congested, so they are
about to be) after the engine has stayed under ``busy_low`` for a dwell of
``dwell_cycles`` agent cycles: an engine that was idle before congestion opens at it,
pausing nobody. Opened so, it keeps the mode unless it clearly does not pay: the first
dwell lets the agents it released warm up, and if over the second less work is done per
second than over the last dwell resident (by more than :data:`TIE`), it closes again.
Every close doubles the dwell before the next try.
Pure: time comes in with each update.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["TIE", "EngineLoad", "Ewma", "Mode"]

TIE = 0.25
"""Open is kept unless it serves this much less work per second than resident did. The
two are measured at different times of a swarm's life, so only a clear loss counts: on
anything closer, no control (the baseline concur must never lose to) wins."""


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


def _streak(holds: bool, since: float | None, start: float) -> float | None:
    """Since when a condition has held without a break (``None`` while it does not):
    ``since`` while it goes on, ``start`` when it begins."""
    if not holds:
        return None
    return start if since is None else since


@dataclass(slots=True)
class EngineLoad:
    """The agents' pace, the engine's busy share and the mode they imply."""

    busy_low: float
    share_high: float
    dwell_cycles: float
    min_dwell_s: float
    mode: Mode = Mode.RESIDENT
    since: float = 0.0
    """When the current mode began."""
    busy: Ewma | None = None
    cycle: Ewma | None = None
    """An agent's cycle: its request's time plus its tool call's."""
    share: Ewma | None = None
    """The agents' engine share: their requests' time over their cycle."""
    idle_since: float | None = None
    """Since when, resident, the engine has stayed under ``busy_low`` (agents about)."""
    bound_since: float | None = None
    """Since when, open, the agents' engine share has stayed over ``share_high`` with the
    cache congested."""
    first_share_at: float | None = None
    """When the cycle behind the first reading of the share began: set by that reading, for
    the step of the same tick (which dates a streak back to it), then cleared."""
    resident_rate: float | None = None
    """Requests completed per second resident, over the dwell before it last opened."""
    completions: deque[tuple[float, int, int]] = field(default_factory=deque)
    """(tick time, requests completed and context tokens served in the interval that ended
    then), for the recent ticks."""
    backoff: float = 1.0
    """Multiplies the dwell before opening: doubled by every failed try."""
    judged: bool = False
    """Open: whether it was compared with resident yet (once, two dwells in)."""

    def __post_init__(self) -> None:
        self.busy, self.cycle, self.share = Ewma(), Ewma(), Ewma()

    def dwell(self, cycles: float | None = None) -> float:
        """Seconds to wait before judging: ``dwell_cycles`` agent cycles (or ``cycles``),
        at least ``min_dwell_s``."""
        assert self.cycle is not None
        cycle = self.cycle.value or 0.0
        return max(self.min_dwell_s, (self.dwell_cycles if cycles is None else cycles) * cycle)

    def update(
        self,
        now: float,
        interval_s: float | None,
        busy: float | None,
        completed: int,
        latency_s: float | None,
        tool_s: float | None,
        served_tokens: int = 0,
    ) -> None:
        """Fold in one tick's interval, which ended at ``now`` (nothing when the interval or
        the busy share is unknown: the first tick, or a gate that measures no pace)."""
        assert self.busy is not None and self.cycle is not None and self.share is not None
        if not interval_s or busy is None:
            return
        if latency_s is not None and tool_s is not None and latency_s + tool_s > 0:
            if self.share.value is None:
                # A first reading is one whole cycle of the agents' (a request and the tool
                # call after it): it has held since that cycle began.
                self.first_share_at = now - (latency_s + tool_s)
            self.cycle.add(latency_s + tool_s, interval_s, max(1.0, self.cycle.value or 1.0))
            tau = max(1.0, self.cycle.value or 1.0)
            self.share.add(latency_s / (latency_s + tool_s), interval_s, tau)
        self.busy.add(busy, interval_s, max(1.0, self.cycle.value or 1.0))
        ticks = self.completions
        ticks.append((now, completed, served_tokens))
        while ticks and now - ticks[0][0] > 4 * self.dwell() * self.backoff:
            ticks.popleft()

    def rate(self, start: float, end: float) -> float | None:
        """Work done per second in the ticks of ``(start, end]``: context tokens served
        when requests report their usage, else requests completed.

        Served tokens weigh each step by its context, so a rate measured early in a
        swarm's life (short contexts, quick steps) compares fairly with one measured
        later: both modes slow down about in proportion to the contexts.
        """
        if end <= start:
            return None
        window = [(n, tokens) for t, n, tokens in self.completions if start < t <= end]
        tokens = sum(tokens for _, tokens in window)
        done = tokens if tokens else sum(n for n, _ in window)
        return done / (end - start)

    def step(self, now: float, held_back: bool, congested: bool) -> Mode:
        """The mode for this tick. ``held_back``: agents wait (queued or paused);
        ``congested``: the cache is over its threshold."""
        assert self.busy is not None and self.share is not None
        dwell = self.dwell()
        first, self.first_share_at = self.first_share_at, None
        if self.mode is Mode.OPEN:
            share = self.share.value
            bound = congested and share is not None and share > self.share_high
            # A streak that begins with the first reading began with the cycle behind it.
            self.bound_since = _streak(bound, self.bound_since, now if first is None else first)
            if self.bound_since is not None and now - self.bound_since >= self.dwell(1.0):
                # For an agent cycle the agents waited on the engine more than they worked:
                # the engine is the bottleneck, and misses take from useful work.
                self.backoff *= 2.0
                self._switch(Mode.RESIDENT, now)
            elif not self.judged and now - self.since >= 2 * dwell:
                # The first dwell is the agents let in warming up; the second is judged.
                self.judged = True
                rate, before = self.rate(self.since + dwell, now), self.resident_rate
                if rate is not None and before is not None and rate < before * (1 - TIE):
                    self.backoff *= 2.0  # it did not pay: try again later, if at all
                    self._switch(Mode.RESIDENT, now)
            return self.mode
        # Idle is judged only once an agent cycle has been seen: before it, the dwell
        # has no length, and the busy share may still hold the quiet before the swarm.
        idle = (
            self.cycle is not None
            and self.cycle.value is not None
            and self.busy.value is not None
            and self.busy.value < self.busy_low
        )
        self.idle_since = _streak(idle, self.idle_since, now)
        # Held back, or about to be (congested): an engine idle for a dwell already opens
        # at once, before anyone is paused for nothing.
        if (
            (held_back or congested)
            and self.idle_since is not None
            and now - self.idle_since >= dwell * self.backoff
        ):
            self.resident_rate = self.rate(now - dwell, now)
            self._switch(Mode.OPEN, now)
        return self.mode

    def _switch(self, mode: Mode, now: float) -> None:
        self.mode = mode
        self.since = now
        self.idle_since = self.bound_since = None
        self.judged = False
        # The other mode's load says nothing about this one.
        self.busy, self.share = Ewma(), Ewma()
