"""The policy contract: pure, synchronous control laws with time passed in.

A policy sees one :class:`Observation` per control tick and returns a
:class:`Decision`. It never reads a clock, never does I/O and never awaits:
the proxy and the simulator feed it the same data, the proxy on wall-clock
time and the simulator on virtual time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything a policy may look at, at one tick.

    Engine fields come from the latest engine signal (``None`` when unknown);
    agent fields come from the admission gate. ``live`` agents are admitted
    and not paused; their context tokens make up the live working set.
    """

    now: float
    window: int | None
    """The window currently applied by the gate (``None`` = unlimited)."""
    live: int = 0
    paused: int = 0
    queued: int = 0
    kv_usage: float | None = None
    hit_rate: float | None = None
    """Prefix-cache hit rate over the last interval."""
    new_preemptions: float | None = None
    """Preemptions since the previous tick."""
    engine_running: int | None = None
    engine_waiting: int | None = None
    capacity_tokens: int | None = None
    live_tokens: int = 0
    """Sum of live agents' context tokens."""
    growth_tokens: float = 0.0
    """Expected further growth of live agents' contexts (learned online)."""
    live_contexts_newest_first: tuple[int, ...] = ()
    """Context tokens of live agents, most recently admitted first (pause order)."""
    candidate_contexts: tuple[int, ...] = ()
    """Context tokens of agents waiting to run, in release order (paused, then queued)."""
    draining: int = 0
    """Paused agents whose last request is still in the engine: the cache they hold frees
    as it ends, whatever the window."""
    stale: bool = False
    """True when the engine signal is older than the poller's ``stale_after``."""
    interval_s: float | None = None
    """Seconds since the previous tick (``None`` at the first); the fields below cover it."""
    busy: float | None = None
    """Fraction of the interval with at least one request of the agents in flight: how
    much of it the engine had their work."""
    completed: int = 0
    """Requests that ended in the interval."""
    latency_s: float | None = None
    """Their mean time from grant to end (``None`` when none ended)."""
    tool_s: float | None = None
    """Mean pause of the agents that came back from a tool call in the interval."""
    served_tokens: int = 0
    """Context tokens (prompt and completion) of the requests that finished in the
    interval and reported their usage."""

    @property
    def in_use(self) -> bool:
        """The window is in use: it is full, or agents wait for it."""
        full = self.window is not None and self.live >= self.window
        return full or self.queued > 0 or self.paused > 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gate should do until the next tick."""

    window: int | None
    """Maximum live agents; ``None`` = no limit."""
    pressure: float | None = None
    parts: Mapping[str, float | None] = field(default_factory=dict)
    """The pressure's components (``kv``, ``working_set``, ``projected``)."""
    reason: str = "hold"
    """Why the window is what it is: ``increase``, ``decrease``, ``cooldown``, ``hold``, ..."""
    pause: bool = False
    """Hold the next request of the newest live agents beyond the window."""
    hold_requests: bool = False
    """Request-level gating: hold every new request, whatever its agent (``epp``)."""
    release_limit: int | None = None
    """At most this many paused or queued agents released per tick (``None`` = no limit)."""
    admit_new: bool = True
    """False: no queued agent is admitted until a later decision says so, whatever the
    window (the ``closed`` failure mode); admitted agents carry on and resume."""


@runtime_checkable
class Policy(Protocol):
    """A control law: one decision per tick, from data alone."""

    name: str

    def initial_window(self) -> int | None:
        """The window to start with, before the first decision (``None`` = no limit)."""
        ...

    def decide(self, obs: Observation) -> Decision:
        """Return the decision for this tick. Must not read clocks or do I/O."""
        ...

    def describe(self) -> dict[str, object]:
        """The policy's name and parameters, for status pages and logs."""
        ...


@runtime_checkable
class Resumable(Protocol):
    """A policy with learned state (a window it moves) that can take over a running gate."""

    def resume_from(self, window: int | None, live: int) -> int | None:
        """Continue from the ``window`` in force (``None``: none, with ``live`` agents
        running) instead of the initial window; returns the window to apply now."""
        ...
