"""The demo's workloads, and how to run ``concur engine`` and ``concur serve`` for them.

A :class:`Scenario` is a seeded synthetic trace (a ``swe-swarm`` shape with
overrides) plus the simulated engine it runs on and the time scale. Both were
chosen by measurement: with no admission control the agents' working set
outgrows the KV cache, prefixes are evicted between tool calls and recomputed
(hit rate ~20%, millions of tokens recomputed), and the offline simulator puts
the uncontrolled makespan at 2.5x (default) and 1.8x (quick) concur's default
AIMD; live at speed 10 on two cores the gap measured 1.8-2.0x and 1.5x, with
each half of the default demo taking 20-35 s of wall time (quick: 10-15 s).

Time scaling: ``concur engine --speed S`` runs S times faster than real time, so
every time constant of the proxy that the simulator expresses in simulated
seconds (control interval, metric poll interval, AIMD's decrease cooldown) is
divided by S too (:func:`live_settings`); that is what makes the live path and
``concur sim`` comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from concur.policies.aimd import AIMDParams
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.trace import Trace

__all__ = [
    "DEFAULT",
    "QUICK",
    "REAL_SHAPES",
    "SCENARIOS",
    "Scenario",
    "live_settings",
    "real_scenario",
    "set_flags",
]


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Scenario:
    """A trace, an engine and a time scale."""

    name: str
    description: str
    shape: str = "swe-swarm"
    seed: int = 0
    overrides: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    """:class:`~concur.sim.generate.Shape` fields replaced in ``shape``."""
    model: str = "qwen3-32b"
    gpu: str = "h100"
    tp: int = 2
    kv_tokens: int = 150_000
    speed: float = 10.0
    preset: str | None = None
    """A measured engine (``concur sim run --preset``) instead of model/GPU/TP: the real
    vLLM scenarios' ``cpu-tiny``."""

    def trace(self) -> Trace:
        return generate(self.shape, self.seed, **dict(self.overrides))

    def engine_spec(self) -> EngineSpec:
        """The offline simulator's view of the same engine."""
        if self.preset is not None:
            return EngineSpec.from_preset(self.preset, kv_capacity_tokens=self.kv_tokens)
        return EngineSpec(
            model=self.model, gpu=self.gpu, tp=self.tp, kv_capacity_tokens=self.kv_tokens
        )

    def engine_args(self, port: int, *, speed: float | None = None) -> list[str]:
        """``concur engine`` arguments (after ``concur engine``) on 127.0.0.1:``port``."""
        return [
            "--model",
            self.model,
            "--gpu",
            self.gpu,
            "--tp",
            str(self.tp),
            "--kv-tokens",
            str(self.kv_tokens),
            "--speed",
            f"{speed if speed is not None else self.speed:g}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": self.shape,
            "seed": self.seed,
            "overrides": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()
            },
            "model": self.model,
            "gpu": self.gpu,
            "tp": self.tp,
            "kv_tokens": self.kv_tokens,
            "speed": self.speed,
            "preset": self.preset,
        }


_SWARM = {
    "steps": (10, 20),
    "first_input_tokens": (2000, 4000),
    "input_tokens": (500, 1500),
    "output_tokens": (30, 80),
    "shared_prefix_tokens": 1024,
    "tool_latency_median_s": 1.0,
}

DEFAULT = Scenario(
    name="default",
    description=(
        "32 coding agents at once, 10-20 steps each, contexts growing to ~24k tokens, "
        "150k tokens of KV cache"
    ),
    overrides=_frozen({**_SWARM, "agents": 32}),
    kv_tokens=150_000,
    speed=10.0,
)

QUICK = Scenario(
    name="quick",
    description=(
        "20 coding agents at once, 8-14 steps each, contexts growing to ~19k tokens, "
        "80k tokens of KV cache"
    ),
    overrides=_frozen({**_SWARM, "agents": 20, "steps": (8, 14), "input_tokens": (800, 1500)}),
    kv_tokens=80_000,
    speed=10.0,
)

SCENARIOS: Mapping[str, Scenario] = MappingProxyType({"default": DEFAULT, "quick": QUICK})

REAL_SHAPES = ("engine-bound", "tool-bound", "staggered")
"""``concur demo --vllm --shape``: bench/real_engine.py's regimes."""


def real_scenario(shape: str) -> Scenario:
    """One of bench/real_engine.py's regimes on a real vLLM (its CPU build), in real time."""
    if shape not in REAL_SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(REAL_SHAPES)} with --vllm")
    trace = generate(shape, 0)
    return Scenario(
        name=f"vllm-{shape}",
        description=(
            f"{len(trace.agents)} coding agents ({shape}: {_REAL_WHY[shape]}), "
            "32,768 tokens of KV cache"
        ),
        shape=shape,
        model="concur-tiny",
        kv_tokens=32_768,
        speed=1.0,
        preset="cpu-tiny",
    )


_REAL_WHY = {
    "engine-bound": "long outputs, short tool calls: the engine is the bottleneck",
    "tool-bound": "short outputs, long tool calls: the engine idles between steps",
    "staggered": "arrivals over time, mixed step counts",
}


def live_settings(speed: float, control_interval: float = 1.0) -> dict[str, Any]:
    """``concur serve`` settings (dotted keys) that run its control loop on simulated time.

    The control interval, the metric poll interval (half of it), AIMD's decrease
    cooldown and its engine-aware dwell are given in simulated seconds and
    divided by ``speed``;
    staleness stays generous in wall seconds, so a busy engine does not look dead.
    """
    interval = control_interval / speed
    poll = interval / 2
    aimd = AIMDParams()  # its defaults, in simulated seconds
    return {
        "control.interval": interval,
        "engine.poll_interval": poll,
        "engine.poll_timeout": max(1.0, 4 * poll),
        "engine.stale_after": max(2.0, 8 * poll),
        "policy.aimd.decrease_cooldown": aimd.decrease_cooldown / speed,
        "policy.aimd.open_dwell": aimd.open_dwell / speed,
        "server.drain_timeout": 5.0,
        # A batch swarm waits in the queue by design, in FIFO order: as long as the
        # swarm client waits for a response (its --timeout), not the 60 s default.
        "admission.max_queue_wait": 600.0,
    }


def set_flags(settings: Mapping[str, Any]) -> list[str]:
    """``--set key=value`` arguments for ``concur serve``."""
    out: list[str] = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out
