"""Online estimate of how much live agents' contexts will still grow.

Agents re-send a growing context at every step, so the working set of the
agents admitted now keeps rising after admission. The estimator learns, from
the agents seen so far, the mean growth per step and how many steps agents
take, and projects each live agent's final context. Pure and clock-free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GrowthEstimator:
    """Running means of per-step context growth and of agent length in steps."""

    _growth_sum: float = 0.0
    _growth_steps: int = 0
    _ended_steps_sum: int = 0
    _ended: int = 0
    _max_steps_seen: int = 0

    def observe_step(self, growth_tokens: int, steps_done: int) -> None:
        """An agent's context grew by ``growth_tokens`` on its ``steps_done``-th request."""
        if growth_tokens > 0:
            self._growth_sum += growth_tokens
            self._growth_steps += 1
        self._max_steps_seen = max(self._max_steps_seen, steps_done)

    def observe_end(self, steps_done: int) -> None:
        """An agent ended after ``steps_done`` requests."""
        self._ended_steps_sum += steps_done
        self._ended += 1
        self._max_steps_seen = max(self._max_steps_seen, steps_done)

    @property
    def growth_per_step(self) -> float:
        return self._growth_sum / self._growth_steps if self._growth_steps else 0.0

    @property
    def expected_steps(self) -> float:
        """Mean length of ended agents; before any ends, the longest seen so far."""
        if self._ended:
            return self._ended_steps_sum / self._ended
        return float(self._max_steps_seen)

    def remaining_growth(self, steps_done: int) -> float:
        """Expected further context growth of an agent that has done ``steps_done`` steps."""
        remaining = max(0.0, self.expected_steps - steps_done)
        return remaining * self.growth_per_step
