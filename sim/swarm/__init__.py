"""``concur swarm``: replay a trace as real concurrent agents over HTTP."""

from concur.sim.swarm.client import (
    AgentResult,
    SwarmOptions,
    SwarmResult,
    SwarmSummary,
    run_swarm,
)

__all__ = ["AgentResult", "SwarmOptions", "SwarmResult", "SwarmSummary", "run_swarm"]
