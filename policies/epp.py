"""``epp``: a request-level gate, as the Gateway API Inference Extension does.

Every request (not agent) is held while the engine looks saturated: KV usage
above ``kv_threshold`` or more than ``queue_threshold`` requests waiting. It
knows nothing of agents, so it cannot keep an agent's prefix warm: a
comparison baseline.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from concur.policies import pressure as pressure_mod
from concur.policies.base import Decision, Observation


class EPPParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    kv_threshold: float = Field(0.8, ge=0.0, le=1.0)
    """Hold every request while engine KV usage is above this."""
    queue_threshold: int = Field(5, ge=0)
    """Hold every request while more requests than this wait."""


class EPP:
    name = "epp"

    def __init__(self, params: EPPParams | None = None) -> None:
        self.params = params or EPPParams()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.params.model_dump()}

    def initial_window(self) -> int | None:
        return None

    def decide(self, obs: Observation) -> Decision:
        prm = self.params
        values = pressure_mod.parts(obs)
        kv_high = obs.kv_usage is not None and obs.kv_usage > prm.kv_threshold
        queue_high = obs.engine_waiting is not None and obs.engine_waiting > prm.queue_threshold
        hold = kv_high or queue_high
        return Decision(
            window=None,
            pressure=obs.kv_usage,
            parts=values,
            reason="saturated" if hold else "open",
            hold_requests=hold,
        )
