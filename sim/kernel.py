"""A small deterministic discrete-event kernel with a virtual clock.

Events live in a heap ordered by ``(time, priority, seq)``: earlier time first;
at the same time, lower :class:`Priority` first; at the same time and priority,
the order in which they were scheduled (``seq`` is a per-kernel counter, so two
kernels never share state). Callbacks take no arguments: close over what they
need. Nothing here reads a wall clock or global randomness; the one seeded
``random.Random`` of a run may be handed to the kernel and read back as
:attr:`EventKernel.rng` by whoever drives the simulation.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

__all__ = ["EventHandle", "EventKernel", "Priority", "RunResult", "StopReason"]


class Priority(IntEnum):
    """Order of events that fall on the same instant (lower runs first).

    - ``ENGINE_STEP_DONE``: an engine step's outputs are delivered first, so
      finished requests free their blocks and agents learn their results before
      anything else happens at that instant.
    - ``TOOL_DONE``: agents that already hold a slot come back from a tool call
      before new agents arrive, so their (warm) requests queue ahead.
    - ``AGENT_ARRIVAL``: new agents reach the admission gate.
    - ``CONTROL_TICK``: the policy reads the state after all of the above.
    - ``ENGINE_STEP_START``: the engine starts its next step last, so every
      request submitted at this instant (by arrivals, returning agents or a
      tick that admitted agents) joins that step.
    - ``DEFAULT``: anything else, after the engine kick.

    The values leave gaps so a runner can slot its own levels in between.
    """

    ENGINE_STEP_DONE = 0
    TOOL_DONE = 10
    AGENT_ARRIVAL = 20
    CONTROL_TICK = 30
    ENGINE_STEP_START = 40
    DEFAULT = 50


class EventHandle:
    """A scheduled event; :meth:`cancel` it to drop it before it runs."""

    __slots__ = ("_callback", "_cancelled", "_done", "priority", "seq", "time")

    def __init__(self, time: float, priority: int, seq: int, callback: Callable[[], None]) -> None:
        self.time = time
        self.priority = priority
        self.seq = seq
        self._callback: Callable[[], None] | None = callback
        self._cancelled = False
        self._done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        """True once the event has run."""
        return self._done

    @property
    def pending(self) -> bool:
        """True while the event is still due to run."""
        return not (self._cancelled or self._done)

    def cancel(self) -> bool:
        """Cancel the event. Returns False if it already ran or was cancelled."""
        if self._cancelled or self._done:
            return False
        self._cancelled = True
        self._callback = None
        return True

    def __lt__(self, other: EventHandle) -> bool:
        # Only reached when (time, priority, seq) tie, which seq rules out; kept
        # so heapq never compares anything undefined.
        return self.seq < other.seq

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "done" if self._done else "pending"
        return f"EventHandle(t={self.time!r}, prio={self.priority}, seq={self.seq}, {state})"


StopReason = Literal["empty", "until", "max_events", "stopped"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a call to :meth:`EventKernel.run` ended."""

    end_time: float
    """The kernel's clock when ``run`` returned."""
    events_processed: int
    """Events whose callbacks ran during this call (cancelled ones excluded)."""
    stopped_by_until: bool
    """True if ``run`` stopped because the next event lies after ``until``."""
    reason: StopReason
    """``empty`` (nothing left), ``until``, ``max_events`` or ``stopped`` (:meth:`stop`)."""


_Entry = tuple[float, int, int, EventHandle]


class EventKernel:
    """Heap of timed callbacks and the virtual clock they advance.

    Args:
        rng: the run's seeded random generator, kept here for callers to share
            (the kernel itself never draws from it). A fresh ``Random(0)`` if
            omitted, so a run is deterministic either way.
        start: the initial clock value.
    """

    def __init__(self, rng: random.Random | None = None, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"start must be a finite time, got {start!r}")
        self.rng = rng if rng is not None else random.Random(0)
        self._now = float(start)
        self._heap: list[_Entry] = []
        self._seq = 0
        self._stop = False
        self._events_total = 0

    @property
    def now(self) -> float:
        """The virtual time of the event being run, or of the last one run."""
        return self._now

    @property
    def pending(self) -> int:
        """Events scheduled and neither run nor cancelled."""
        # Cancelled handles stay in the heap until popped; count live ones.
        return sum(1 for entry in self._heap if entry[3].pending)

    @property
    def events_total(self) -> int:
        """Events run over the kernel's lifetime."""
        return self._events_total

    def peek(self) -> float | None:
        """Time of the next live event, or None if there is none."""
        heap = self._heap
        while heap and not heap[0][3].pending:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def schedule(
        self,
        at: float,
        priority: int = Priority.DEFAULT,
        callback: Callable[[], None] | None = None,
    ) -> EventHandle:
        """Run ``callback`` at absolute virtual time ``at``.

        ``at`` may equal :attr:`now` (the event runs after those already due at
        this instant with the same or a lower priority) but never lie before it.
        """
        if callback is None:
            raise ValueError("schedule() needs a callback")
        if not math.isfinite(at):
            raise ValueError(f"event time must be finite, got {at!r}")
        if at < self._now:
            raise ValueError(f"cannot schedule an event in the past: at={at!r} < now={self._now!r}")
        seq = self._seq
        self._seq = seq + 1
        handle = EventHandle(float(at), int(priority), seq, callback)
        heapq.heappush(self._heap, (handle.time, handle.priority, seq, handle))
        return handle

    def schedule_in(
        self,
        delay: float,
        priority: int = Priority.DEFAULT,
        callback: Callable[[], None] | None = None,
    ) -> EventHandle:
        """Run ``callback`` ``delay`` seconds after :attr:`now` (``delay`` >= 0)."""
        if not delay >= 0.0:  # also rejects NaN
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        return self.schedule(self._now + delay, priority, callback)

    def cancel(self, handle: EventHandle) -> bool:
        """Cancel ``handle``; same as ``handle.cancel()``."""
        return handle.cancel()

    def stop(self) -> None:
        """Ask the running :meth:`run` to return after the current event."""
        self._stop = True

    def run(self, until: float | None = None, max_events: int | None = None) -> RunResult:
        """Run events in order until none are left, the next one lies after
        ``until`` (then the clock is set to ``until``), ``max_events`` callbacks
        have run, or a callback called :meth:`stop`.

        Events at exactly ``until`` do run. With ``until`` given, the clock ends
        at ``until`` also when the heap empties earlier (as SimPy does).
        """
        if until is not None:
            if not math.isfinite(until):
                raise ValueError(f"until must be finite, got {until!r}")
            if until < self._now:
                raise ValueError(f"until={until!r} lies before now={self._now!r}")
        if max_events is not None and max_events < 0:
            raise ValueError(f"max_events must be >= 0, got {max_events!r}")
        self._stop = False
        heap = self._heap
        processed = 0
        reason: StopReason = "empty"
        while True:
            if max_events is not None and processed >= max_events:
                reason = "max_events"
                break
            if not heap:
                reason = "empty"
                break
            at, _prio, _seq, handle = heap[0]
            if not handle.pending:
                heapq.heappop(heap)
                continue
            if until is not None and at > until:
                reason = "until"
                break
            heapq.heappop(heap)
            self._now = at
            callback = handle._callback
            handle._done = True
            handle._callback = None
            assert callback is not None
            callback()
            processed += 1
            self._events_total += 1
            if self._stop:
                reason = "stopped"
                break
        if reason == "until" or (reason == "empty" and until is not None):
            assert until is not None
            self._now = max(self._now, until)
        self._stop = False
        return RunResult(
            end_time=self._now,
            events_processed=processed,
            stopped_by_until=reason == "until",
            reason=reason,
        )
