"""Fixed windows: ``static:N`` (a hand-picked cap) and ``unlimited`` (no control)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from concur.policies import pressure as pressure_mod
from concur.policies.base import Decision, Observation


class StaticParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    window: int = Field(64, ge=1)
    """The fixed number of live agents."""


def _report(obs: Observation) -> tuple[float | None, dict[str, float | None]]:
    values = pressure_mod.parts(obs)
    return pressure_mod.combine(values, ("kv", "working_set")), values


class Static:
    """A fixed cap on live agents, whatever the engine says."""

    name = "static"

    def __init__(self, params: StaticParams | None = None) -> None:
        self.params = params or StaticParams()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.params.model_dump()}

    def initial_window(self) -> int | None:
        return self.params.window

    def decide(self, obs: Observation) -> Decision:
        p, values = _report(obs)
        return Decision(window=self.params.window, pressure=p, parts=values, reason="fixed")


class Unlimited:
    """No admission control at all: today's behaviour, the baseline."""

    name = "unlimited"

    def describe(self) -> dict[str, object]:
        return {"name": self.name}

    def initial_window(self) -> int | None:
        return None

    def decide(self, obs: Observation) -> Decision:
        p, values = _report(obs)
        return Decision(window=None, pressure=p, parts=values, reason="unlimited")
