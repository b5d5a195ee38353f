"""Scaled wall-clock time: simulated seconds pass ``speed`` times faster than wall seconds.

The wall clock is injected (the event loop's ``loop.time``), so the mapping is
pure and testable: ``sim = sim0 + (wall - wall0) x speed`` and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["ScaledClock", "WallClock"]

WallClock = Callable[[], float]
"""Monotonic wall seconds (``asyncio.get_running_loop().time``)."""


class ScaledClock:
    """Simulated time driven by a wall clock, ``speed`` times faster."""

    __slots__ = ("_sim0", "_wall", "_wall0", "speed")

    def __init__(self, speed: float, wall: WallClock, *, start: float = 0.0) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number, got {speed}")
        self.speed = speed
        self._wall = wall
        self._wall0 = wall()
        self._sim0 = start

    def now(self) -> float:
        """Simulated seconds now."""
        return self._sim0 + (self._wall() - self._wall0) * self.speed

    def wall(self) -> float:
        """Wall seconds now (the injected clock)."""
        return self._wall()

    def wall_at(self, sim_time: float) -> float:
        """The wall time at which simulated time reaches ``sim_time``."""
        return self._wall0 + (sim_time - self._sim0) / self.speed

    def to_wall(self, sim_seconds: float) -> float:
        """A simulated duration in wall seconds."""
        return sim_seconds / self.speed
