"""Seeded synthetic agent swarms of named shapes.

``generate("swe-swarm", seed=1)`` returns the same :class:`~concur.sim.trace.Trace`
every time for the same shape, seed and overrides; all randomness comes from one
``random.Random(seed)`` made per call. A shape is a frozen :class:`Shape`; keyword
overrides replace its fields, e.g. ``generate("swe-swarm", 7, agents=64,
steps=(5, 10))``.

Shapes (see :func:`shapes`):

- ``swe-swarm``: 256 coding agents arriving together at t=0, 10-40 steps each. Step 0
  is 3,000-6,000 tokens including a 2,048-token system prompt shared by every agent;
  later steps add tool output of 300-3,000 tokens; each response is 100-600 tokens;
  tool calls take a lognormal time with a 3 s median.
- ``swe-swarm-staggered``: the same agents arriving uniformly at random over 60 s.
- ``chat``: 120 chat users arriving as a Poisson process at 2/s (about a minute),
  2-8 turns, short contexts with a 256-token shared system prompt, a few seconds of
  think time between turns.
- ``small``: a first try that shows admission control in seconds: 24 coding agents
  arriving over 10 s, 4-8 steps, first prompts of 10-16k tokens (a 2,048-token shared
  system prompt) and 1.5-3.5k tokens added per step, outputs of 50-150 tokens, tool
  calls of median 1 s. Contexts grow to ~30k tokens, so the agents' working set (~600k
  tokens if all ran at once) outgrows the 320,592-token KV cache of ``concur sim``'s
  default engine (Qwen3-32B on 2 x H100): without control the prefix cache thrashes.
- ``tiny``: 8 agents, 2-4 steps, contexts under 1.5k tokens, a 512-token shared prompt,
  sub-second tools: for tests (it puts no pressure on any real cache).

Three shapes sized for a 32,768-token KV cache, the regimes of
``bench/real_engine.py`` on a real vLLM (each agent's final context is 30-45% of
that cache):

- ``tool-bound``: 16 coding agents at t=0, 8-12 steps, first prompts of 2-3k tokens,
  400-900 tokens added per step, outputs of 60-120 tokens, tool calls of ~0.5-2 s
  (median 1 s): agents spend most of their time in tools.
- ``engine-bound``: the same agents with outputs of 200-400 tokens and tool calls of
  ~0.2-1 s (median 0.45 s): the engine is the bottleneck.
- ``staggered``: 24 agents arriving over 40 s with 3-16 steps each (mixed lengths),
  a 512-token shared system prompt, outputs of 60-250 tokens, tools of median 0.8 s.

Sampling: integer ranges are inclusive and uniform; tool latencies are
``lognormvariate(ln(median), sigma)`` rounded to milliseconds; the last step's tool
latency is 0 (it is ignored anyway). Arrivals are ``burst`` (all at 0), ``uniform``
(uniform over ``[0, arrival_window_s]``, sorted) or ``poisson`` (exponential gaps at
rate ``agents / arrival_window_s``, first agent at 0). Agent ids follow arrival order.
With ``max_context_tokens`` set, an agent stops before a step whose prompt plus
output would exceed it (it always keeps at least one step).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from concur.sim.trace import AgentTrace, SharedPrefix, Step, Trace

__all__ = ["GenerateError", "Shape", "generate", "get_shape", "shapes"]

ArrivalKind = Literal["burst", "uniform", "poisson"]
_ARRIVALS: tuple[str, ...] = ("burst", "uniform", "poisson")
IntRange = tuple[int, int]


class GenerateError(ValueError):
    """An unknown shape, an unknown override, or an invalid parameter value."""


def _check_range(name: str, value: object, minimum: int) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise GenerateError(f"{name}: must be a (low, high) pair of integers, got {value!r}")
    low, high = value
    if low < minimum or high < low:
        raise GenerateError(f"{name}: must satisfy {minimum} <= low <= high, got {value!r}")


@dataclass(frozen=True, slots=True)
class Shape:
    """Parameters of a synthetic swarm. Ranges are inclusive ``(low, high)`` pairs."""

    name: str
    description: str
    agents: int
    steps: IntRange
    first_input_tokens: IntRange
    input_tokens: IntRange
    output_tokens: IntRange
    shared_prefix_tokens: int = 0
    arrival: ArrivalKind = "burst"
    arrival_window_s: float = 0.0
    tool_latency_median_s: float = 1.0
    tool_latency_sigma: float = 0.5
    max_context_tokens: int | None = None
    agent_prefix: str = "agent"

    def __post_init__(self) -> None:
        if not isinstance(self.agents, int) or isinstance(self.agents, bool) or self.agents < 1:
            raise GenerateError(f"agents: must be an integer >= 1, got {self.agents!r}")
        _check_range("steps", self.steps, 1)
        _check_range("first_input_tokens", self.first_input_tokens, 1)
        _check_range("input_tokens", self.input_tokens, 1)
        _check_range("output_tokens", self.output_tokens, 1)
        prefix = self.shared_prefix_tokens
        if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
            raise GenerateError(
                f"shared_prefix_tokens: must be an integer >= 0, got {self.shared_prefix_tokens!r}"
            )
        if self.shared_prefix_tokens > self.first_input_tokens[0]:
            raise GenerateError(
                f"shared_prefix_tokens: must be <= first_input_tokens low "
                f"({self.first_input_tokens[0]}), got {self.shared_prefix_tokens}"
            )
        if self.arrival not in _ARRIVALS:
            raise GenerateError(
                f"arrival: must be one of {', '.join(_ARRIVALS)}, got {self.arrival!r}"
            )
        _check_seconds("arrival_window_s", self.arrival_window_s, allow_zero=True)
        if self.arrival == "poisson" and self.arrival_window_s <= 0:
            raise GenerateError("arrival_window_s: must be > 0 for poisson arrivals")
        _check_seconds("tool_latency_median_s", self.tool_latency_median_s, allow_zero=False)
        _check_seconds("tool_latency_sigma", self.tool_latency_sigma, allow_zero=True)
        if self.max_context_tokens is not None and (
            isinstance(self.max_context_tokens, bool)
            or not isinstance(self.max_context_tokens, int)
            or self.max_context_tokens < 2
        ):
            raise GenerateError(
                f"max_context_tokens: must be None or an integer >= 2, "
                f"got {self.max_context_tokens!r}"
            )
        if not self.agent_prefix:
            raise GenerateError("agent_prefix: must be a non-empty string")


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise GenerateError(f"{name}: must be a finite number {bound}, got {value!r}")


_TOOL_BOUND = Shape(
    name="tool-bound",
    description="16 agents at t=0, short outputs (60-120), tools of ~0.5-2 s: tool-bound",
    agents=16,
    steps=(8, 12),
    first_input_tokens=(2000, 3000),
    input_tokens=(400, 900),
    output_tokens=(60, 120),
    arrival="burst",
    tool_latency_median_s=1.0,
    tool_latency_sigma=0.35,
    agent_prefix="tool",
)


def _builtin_shapes() -> dict[str, Shape]:
    swe = Shape(
        name="swe-swarm",
        description="256 coding agents at t=0, 10-40 steps, 2k shared system prompt",
        agents=256,
        steps=(10, 40),
        first_input_tokens=(3000, 6000),
        input_tokens=(300, 3000),
        output_tokens=(100, 600),
        shared_prefix_tokens=2048,
        arrival="burst",
        tool_latency_median_s=3.0,
        tool_latency_sigma=0.6,
        agent_prefix="swe",
    )
    return {
        swe.name: swe,
        "swe-swarm-staggered": dataclasses.replace(
            swe,
            name="swe-swarm-staggered",
            description="swe-swarm agents arriving uniformly over 60 s",
            arrival="uniform",
            arrival_window_s=60.0,
        ),
        "chat": Shape(
            name="chat",
            description="120 chat users, Poisson arrivals at 2/s, 2-8 short turns",
            agents=120,
            steps=(2, 8),
            first_input_tokens=(300, 1200),
            input_tokens=(20, 300),
            output_tokens=(50, 500),
            shared_prefix_tokens=256,
            arrival="poisson",
            arrival_window_s=60.0,
            tool_latency_median_s=4.0,
            tool_latency_sigma=0.5,
            agent_prefix="chat",
        ),
        "tool-bound": _TOOL_BOUND,
        "engine-bound": dataclasses.replace(
            _TOOL_BOUND,
            name="engine-bound",
            description="16 agents at t=0, long outputs (200-400), short tools: engine-bound",
            output_tokens=(200, 400),
            tool_latency_median_s=0.45,
            tool_latency_sigma=0.4,
            agent_prefix="eng",
        ),
        "staggered": Shape(
            name="staggered",
            description="24 agents over 40 s, 3-16 steps, 512-token shared prompt",
            agents=24,
            steps=(3, 16),
            first_input_tokens=(1500, 3000),
            input_tokens=(300, 900),
            output_tokens=(60, 250),
            shared_prefix_tokens=512,
            arrival="uniform",
            arrival_window_s=40.0,
            tool_latency_median_s=0.8,
            tool_latency_sigma=0.5,
            agent_prefix="stag",
        ),
        "small": Shape(
            name="small",
            description="24 agents over 10 s, 4-8 steps, contexts to ~30k: outgrows 320k of KV",
            agents=24,
            steps=(4, 8),
            first_input_tokens=(10_000, 16_000),
            input_tokens=(1500, 3500),
            output_tokens=(50, 150),
            shared_prefix_tokens=2048,
            arrival="uniform",
            arrival_window_s=10.0,
            tool_latency_median_s=1.0,
            tool_latency_sigma=0.5,
            agent_prefix="small",
        ),
        "tiny": Shape(
            name="tiny",
            description="8 agents, 2-4 steps, contexts under 1.5k tokens: for tests",
            agents=8,
            steps=(2, 4),
            first_input_tokens=(600, 1000),
            input_tokens=(50, 200),
            output_tokens=(20, 80),
            shared_prefix_tokens=512,
            arrival="uniform",
            arrival_window_s=2.0,
            tool_latency_median_s=0.5,
            tool_latency_sigma=0.4,
            agent_prefix="tiny",
        ),
    }


def shapes() -> Mapping[str, Shape]:
    """The built-in shapes by name (a read-only view)."""
    return MappingProxyType(_builtin_shapes())


def get_shape(name: str, **overrides: Any) -> Shape:
    """The built-in shape ``name`` with ``overrides`` applied and validated."""
    known = _builtin_shapes()
    if name not in known:
        raise GenerateError(
            f"unknown trace shape {name!r}; known shapes: {', '.join(sorted(known))}"
        )
    base = known[name]
    allowed = [f.name for f in dataclasses.fields(Shape) if f.name not in ("name", "description")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise GenerateError(
            f"unknown override(s) {', '.join(unknown)} for shape {name!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    fixed: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
    }
    return dataclasses.replace(base, **fixed)


def _arrivals(spec: Shape, rng: random.Random) -> list[float]:
    if spec.arrival == "burst":
        return [0.0] * spec.agents
    if spec.arrival == "uniform":
        return sorted(round(rng.uniform(0.0, spec.arrival_window_s), 3) for _ in range(spec.agents))
    rate = spec.agents / spec.arrival_window_s
    times = [0.0]
    for _ in range(spec.agents - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return [round(t, 3) for t in times]


def _agent(spec: Shape, rng: random.Random, agent_id: str, arrival_s: float) -> AgentTrace:
    n_steps = rng.randint(*spec.steps)
    mu = math.log(spec.tool_latency_median_s)
    steps: list[Step] = []
    context = 0
    for k in range(n_steps):
        new = rng.randint(*(spec.first_input_tokens if k == 0 else spec.input_tokens))
        out = rng.randint(*spec.output_tokens)
        pause = round(rng.lognormvariate(mu, spec.tool_latency_sigma), 3)
        limit = spec.max_context_tokens
        if steps and limit is not None and context + new + out > limit:
            break
        steps.append(Step(input_tokens=new, output_tokens=out, tool_latency_s=pause))
        context += new + out
    last = steps[-1]
    steps[-1] = Step(input_tokens=last.input_tokens, output_tokens=last.output_tokens)
    prefix = (
        SharedPrefix(id=f"{spec.name}-system", tokens=spec.shared_prefix_tokens)
        if spec.shared_prefix_tokens > 0
        else None
    )
    return AgentTrace(
        agent_id=agent_id, arrival_s=arrival_s, shared_prefix=prefix, steps=tuple(steps)
    )


def generate(shape: str, seed: int, **overrides: Any) -> Trace:
    """A deterministic synthetic trace of the named shape.

    ``overrides`` replace :class:`Shape` fields (``agents``, ``steps``,
    ``arrival_window_s``, ...). Raises :class:`GenerateError` naming the problem and
    what is allowed.
    """
    spec = get_shape(shape, **overrides)
    rng = random.Random(seed)
    width = max(4, len(str(spec.agents - 1)))
    arrivals = _arrivals(spec, rng)
    agents = [
        _agent(spec, rng, f"{spec.agent_prefix}-{i:0{width}d}", arrival)
        for i, arrival in enumerate(arrivals)
    ]
    return Trace(agents=tuple(agents))
