"""``fit``: no window arithmetic, just what fits.

Admit (or resume) the next waiting agent while the live working set plus that
agent's context stays at or under ``low``; pause the newest live agents while
pressure is above ``high``. The output is still a window (the number of live
agents that fit), so the gate enforces it like any other.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from concur.policies import pressure as pressure_mod
from concur.policies.base import Decision, Observation
from concur.policies.pressure import PressureSource


class FitParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    pressure: tuple[PressureSource, ...] = ("kv", "working_set")
    """Sources of pressure, combined by max."""
    high: float = Field(0.85, ge=0.0, le=1.5)
    """Pause the newest live agents while pressure is above this."""
    low: float = Field(0.70, ge=0.0, le=1.5)
    """Admit or resume an agent only while pressure with its context stays <= this."""
    min_window: int = Field(1, ge=1)
    """Never fewer live agents than this, so the swarm always makes progress."""
    pause: bool = True
    """Step-boundary pausing of the newest live agents while pressure is high."""

    @field_validator("pressure", mode="before")
    @classmethod
    def _parse_pressure(cls, v: Any) -> Any:
        return pressure_mod.parse_sources(v)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Fit:
    name = "fit"

    def __init__(self, params: FitParams | None = None) -> None:
        self.params = params or FitParams()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.params.model_dump()}

    def initial_window(self) -> int | None:
        return self.params.min_window

    def decide(self, obs: Observation) -> Decision:
        prm = self.params
        values = pressure_mod.parts(obs)
        p = pressure_mod.combine(values, prm.pressure)
        if p is None:
            return Decision(window=obs.window, pressure=p, parts=values, reason="unknown")
        cap = obs.capacity_tokens
        ws_sources = [s for s in prm.pressure if s != "kv"]
        if p > prm.high:
            # Pause the newest live agents until the working set fits under high again
            # (at least one when engine usage alone is high).
            target = obs.live
            if cap and ws_sources:
                tokens = obs.live_tokens + (obs.growth_tokens if "projected" in ws_sources else 0)
                for ctx in obs.live_contexts_newest_first:
                    if target <= prm.min_window or tokens / cap <= prm.high:
                        break
                    tokens -= ctx
                    target -= 1
            if target == obs.live:
                target = obs.live - 1
            window = max(prm.min_window, target)
            return Decision(window=window, pressure=p, parts=values, reason="over", pause=prm.pause)
        fits = pressure_mod.fitting_candidates(obs, prm.pressure, prm.low)
        window = max(prm.min_window, obs.live + fits)
        return Decision(window=window, pressure=p, parts=values, reason="fit")
