"""The seeded synthetic trace generator: determinism, shapes, overrides, errors."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from concur.sim.generate import GenerateError, generate, get_shape, shapes
from concur.sim.trace import to_jsonl


def test_same_seed_same_trace_different_seed_different() -> None:
    for name in shapes():
        first = generate(name, seed=11, agents=20)
        assert generate(name, seed=11, agents=20) == first
        assert to_jsonl(generate(name, seed=11, agents=20)) == to_jsonl(first)
        assert generate(name, seed=12, agents=20) != first


def test_generator_leaves_global_random_alone() -> None:
    state = random.getstate()
    generate("chat", seed=1)
    assert random.getstate() == state


def test_swe_swarm_shape() -> None:
    trace = generate("swe-swarm", seed=5)
    agents = trace.agents
    assert len(agents) == 256
    assert len({a.agent_id for a in agents}) == 256
    assert all(a.arrival_s == 0.0 for a in agents)
    assert {a.shared_prefix for a in agents} == {agents[0].shared_prefix}
    prefix = agents[0].shared_prefix
    assert prefix is not None
    assert prefix.tokens == 2048
    steps = [len(a.steps) for a in agents]
    assert min(steps) >= 10
    assert max(steps) <= 40
    assert max(steps) - min(steps) > 20  # the range is actually used
    for agent in agents:
        first, *rest = agent.steps
        assert 3000 <= first.input_tokens <= 6000
        assert all(300 <= s.input_tokens <= 3000 for s in rest)
        assert all(100 <= s.output_tokens <= 600 for s in agent.steps)
        assert agent.steps[-1].tool_latency_s == 0.0
        assert all(s.tool_latency_s > 0 for s in agent.steps[:-1])
    pauses = [s.tool_latency_s for a in agents for s in a.steps[:-1]]
    assert 2.7 < statistics.median(pauses) < 3.3  # lognormal around a 3 s median


def test_staggered_swarm_arrives_over_a_minute() -> None:
    trace = generate("swe-swarm-staggered", seed=5)
    arrivals = [a.arrival_s for a in trace.agents]
    assert len(arrivals) == 256
    assert arrivals == sorted(arrivals)
    assert 0.0 <= arrivals[0] < 2.0
    assert 58.0 < arrivals[-1] <= 60.0
    assert len(set(arrivals)) > 200
    # agent ids follow arrival order
    assert [a.agent_id for a in trace.agents] == sorted(a.agent_id for a in trace.agents)


def test_chat_shape_is_poisson_at_two_per_second() -> None:
    trace = generate("chat", seed=2, agents=2000, arrival_window_s=1000.0)
    arrivals = [a.arrival_s for a in trace.agents]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[0] == 0.0
    assert 0.45 < statistics.mean(gaps) < 0.55
    assert statistics.stdev(gaps) > 0.4  # exponential: stdev close to the mean
    assert all(2 <= len(a.steps) <= 8 for a in trace.agents)
    assert max(a.max_context_tokens for a in trace.agents) < 6000
    default = generate("chat", seed=2)
    assert len(default.agents) == 120


def test_small_shape_outgrows_the_default_engines_cache() -> None:
    # concur sim's default engine: Qwen3-32B on 2 x H100, 320,592 tokens of KV cache.
    trace = generate("small", seed=0)
    assert len(trace.agents) == 24
    assert all(4 <= len(a.steps) <= 8 for a in trace.agents)
    assert trace.total_steps < 200
    assert max(a.arrival_s for a in trace.agents) <= 10.0
    finals = [a.max_context_tokens for a in trace.agents]
    assert max(finals) < 40_000  # each agent fits the cache many times over ...
    assert sum(finals) > 1.5 * 320_592  # ... all of them together do not


def test_tiny_shape() -> None:
    trace = generate("tiny", seed=0)
    assert len(trace.agents) == 8
    assert all(2 <= len(a.steps) <= 4 for a in trace.agents)
    assert trace.total_steps < 40
    assert max(a.max_context_tokens for a in trace.agents) < 1500


def test_overrides_replace_shape_fields() -> None:
    trace = generate("swe-swarm", seed=1, agents=10, steps=(3, 3), shared_prefix_tokens=0)
    assert len(trace.agents) == 10
    assert all(len(a.steps) == 3 for a in trace.agents)
    assert all(a.shared_prefix is None for a in trace.agents)
    listed = generate("swe-swarm", seed=1, agents=10, steps=[3, 3], shared_prefix_tokens=0)
    assert listed == trace
    spec = get_shape("chat", agents=7)
    assert spec.agents == 7
    assert spec.name == "chat"


def test_max_context_caps_steps() -> None:
    trace = generate("swe-swarm", seed=4, agents=30, max_context_tokens=20_000)
    assert all(a.max_context_tokens <= 20_000 for a in trace.agents)
    assert all(a.steps[-1].tool_latency_s == 0.0 for a in trace.agents)


def test_unknown_shape_lists_known_shapes() -> None:
    with pytest.raises(GenerateError) as info:
        generate("swarm", seed=1)
    message = str(info.value)
    assert "unknown trace shape 'swarm'" in message
    for name in ("chat", "small", "swe-swarm", "swe-swarm-staggered", "tiny"):
        assert name in message


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"agent": 3}, "unknown override(s) agent"),
        ({"agents": 0}, "agents: must be an integer >= 1, got 0"),
        ({"steps": (5, 2)}, "steps: must satisfy 1 <= low <= high, got (5, 2)"),
        ({"steps": 5}, "steps: must be a (low, high) pair of integers, got 5"),
        ({"shared_prefix_tokens": 4000}, "shared_prefix_tokens: must be <= first_input_tokens"),
        ({"arrival": "sometimes"}, "arrival: must be one of burst, uniform, poisson"),
        ({"arrival": "poisson", "arrival_window_s": 0}, "must be > 0 for poisson"),
        ({"tool_latency_median_s": 0}, "tool_latency_median_s: must be a finite number > 0"),
    ],
)
def test_bad_overrides_are_explained(overrides: dict[str, object], detail: str) -> None:
    with pytest.raises(GenerateError) as info:
        generate("swe-swarm", seed=1, **overrides)
    assert detail in str(info.value)


@pytest.mark.parametrize(
    ("shape", "agents", "outputs", "median_tool"),
    [("tool-bound", 16, (60, 120), 1.0), ("engine-bound", 16, (200, 400), 0.45)],
)
def test_the_real_engine_regimes_outgrow_a_32k_cache(
    shape: str, agents: int, outputs: tuple[int, int], median_tool: float
) -> None:
    trace = generate(shape, 0)
    assert len(trace.agents) == agents
    assert all(a.arrival_s == 0.0 for a in trace.agents)
    finals = [sum(s.input_tokens + s.output_tokens for s in a.steps) for a in trace.agents]
    # each agent's final context is about 25-45% of a 32,768-token cache
    assert min(finals) > 0.2 * 32768 and max(finals) < 0.45 * 32768
    steps = [s for a in trace.agents for s in a.steps]
    assert all(outputs[0] <= s.output_tokens <= outputs[1] for s in steps)
    tools = sorted(s.tool_latency_s for a in trace.agents for s in a.steps[:-1])
    assert tools[len(tools) // 2] == pytest.approx(median_tool, rel=0.25)


def test_the_staggered_regime_arrives_over_40_s_with_mixed_lengths() -> None:
    trace = generate("staggered", 0)
    arrivals = [a.arrival_s for a in trace.agents]
    assert len(arrivals) == 24 and arrivals == sorted(arrivals) and max(arrivals) <= 40.0
    lengths = {len(a.steps) for a in trace.agents}
    assert min(lengths) <= 5 and max(lengths) >= 13
