"""A swarm through ``concur serve`` to ``concur engine``: every agent ends, the window
shrinks under pressure, and the gate is empty afterwards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fakes.harness import wait_for

from concur.sim.generate import generate
from concur.sim.swarm.client import SwarmOptions, run_swarm
from concur.sim.trace import Trace

if TYPE_CHECKING:
    from conftest import StartStack

KV_TOKENS = 24_000


def crowded_trace() -> Trace:
    """12 agents at once whose contexts (2-6k tokens each) outgrow 24k tokens of KV twice."""
    return generate(
        "tiny",
        3,
        agents=12,
        steps=(4, 6),
        first_input_tokens=(1500, 2500),
        input_tokens=(300, 800),
        output_tokens=(20, 40),
        shared_prefix_tokens=256,
        arrival="burst",
        tool_latency_median_s=0.5,
    )


async def test_swarm_through_concur_shrinks_the_window_and_leaves_it_empty(
    start_stack: StartStack,
) -> None:
    trace = crowded_trace()
    # The agents' working set at its peak is twice the KV capacity.
    assert sum(a.max_context_tokens for a in trace.agents) > 2 * KV_TOKENS
    # The cache law (the default starts open and may never close on a swarm this light).
    stack = await start_stack(policy="aimd:cache", kv_tokens=KV_TOKENS, speed=5.0)
    high = stack.runtime.controller.policy.describe()["high"]
    assert isinstance(high, float)
    ended: list[int] = []

    result = await run_swarm(
        trace,
        SwarmOptions(base_url=f"{stack.proxy.url}/v1", speed=stack.speed),
        progress=lambda done, total: ended.append(done),
    )

    s = result.summary
    assert s.errors == {} and s.retries == 0
    assert s.finished_agents == s.agents == 12
    assert s.requests == trace.total_steps
    assert ended == list(range(1, 13))
    assert all(a.steps_done == a.steps for a in result.agents)
    assert s.completion_tokens == sum(a.total_output_tokens for a in trace.agents)
    assert s.client_hit_rate is not None and s.client_hit_rate > 0.3
    # The window went down at a tick where pressure was above `high`.
    shrinks = [
        t
        for t in stack.ticks
        if t.decision.pressure is not None
        and t.decision.pressure > high
        and t.window_before is not None
        and t.decision.window is not None
        and t.decision.window < t.window_before
    ]
    assert shrinks, [(t.window_before, t.decision.window, t.decision.pressure) for t in stack.ticks]
    gate = stack.runtime.gate
    await wait_for(lambda: gate.active == 0 and gate.queued == 0, what="an empty gate")
    status = await stack.status()
    assert (status["active"], status["queued"], status["in_flight"]) == (0, 0, 0)
