"""A picklable description of a simulated engine: model, GPU, parallelism, capacity.

Either a roofline (``--model --gpu --tp``: the step time follows from the
model's size and the GPU's bandwidth and FLOP/s) or a *measured* preset
(``--preset``): an engine that was run and timed, whose step time was fitted to
what it did (:class:`~concur.sim.steptime.MeasuredStepTime`), with its block
size, scheduler budget, cache and the serving time each request spends outside
the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from concur.sim.engine import EngineConfig, engine_config
from concur.sim.scheduler import SchedulingPolicy
from concur.sim.steptime import MeasuredStepTime

__all__ = ["PRESETS", "EnginePreset", "EngineSpec", "get_preset"]


@dataclass(frozen=True, slots=True)
class EnginePreset:
    """A measured engine: what the simulator needs to stand in for it."""

    name: str
    description: str
    step_time: MeasuredStepTime
    kv_capacity_tokens: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    request_overhead_s: float
    """Serving time per request outside the engine's steps (HTTP, chat template, ...)."""
    overhead_per_prompt_token_s: float
    """... and per prompt token (tokenizing the prompt)."""


PRESETS: Mapping[str, EnginePreset] = MappingProxyType(
    {
        "cpu-tiny": EnginePreset(
            name="cpu-tiny",
            description=(
                "vLLM 0.32 CPU build serving the tiny model of concur.sim.realvllm on one "
                "core of a 2-core x86_64 VM (bench/engine_costs.py, 2026-12-07)"
            ),
            # The shape of the 15:24 UTC fit (docs/engine-costs-1525.json: the simulator within
            # 2.5-7.4% of every regime's real runs) at the speed of the 06:40 fit, which the
            # regimes were set on and ``--pace auto`` measures against: every coefficient over
            # 2.336, so a cold prefill of 8,206 tokens, with the request overheads below,
            # still takes 259 ms. The 06:40 fit had decode's attention (per_kv_s) 3x too cheap.
            step_time=MeasuredStepTime(
                base_s=0.0005258,
                per_token_s=7.158e-06,
                per_seq_s=1.463e-05,
                per_pair_s=5.354e-09,
                per_kv_s=2.531e-08,
                frontend_per_seq_s=0.0001524,
                name="cpu-tiny",
            ),
            kv_capacity_tokens=32_768,
            block_size=128,
            max_num_seqs=128,
            max_num_batched_tokens=2048,
            request_overhead_s=0.005,
            overhead_per_prompt_token_s=1.5e-6,
        ),
    }
)
"""Measured engines by name (``concur sim run --preset NAME``)."""


def get_preset(name: str) -> EnginePreset:
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown engine preset {name!r}: choose one of {', '.join(sorted(PRESETS))}"
        ) from None


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What ``--model --gpu --tp --kv-tokens`` (or ``--preset``) say; :meth:`build`
    makes the config."""

    model: str = "qwen3-32b"
    gpu: str = "h100"
    tp: int = 2
    kv_capacity_tokens: int | None = None
    """KV capacity in tokens; derived from GPU memory (or the preset's) when ``None``."""
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    preset: str | None = None
    """A measured engine (:data:`PRESETS`): its step time instead of the roofline."""
    request_overhead_s: float = 0.0
    """Serving time per request outside the engine's steps (see :class:`EnginePreset`)."""
    overhead_per_prompt_token_s: float = 0.0
    step_time: MeasuredStepTime | None = None
    """With a preset: a step time measured again (``bench/engine_costs.py``) instead of
    the preset's, for an engine whose speed drifted since the preset was fitted."""
    scheduling_policy: SchedulingPolicy = "fcfs"
    """vLLM's ``--scheduling-policy`` (``--scheduling-policy`` of ``concur sim``)."""

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        kv_capacity_tokens: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        step_time: MeasuredStepTime | None = None,
        scheduling_policy: SchedulingPolicy = "fcfs",
    ) -> EngineSpec:
        """The preset's engine; the keyword arguments override its values."""
        p = get_preset(name)
        return cls(
            model=p.name,
            gpu="-",
            tp=1,
            kv_capacity_tokens=kv_capacity_tokens or p.kv_capacity_tokens,
            block_size=p.block_size,
            max_num_seqs=max_num_seqs or p.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or p.max_num_batched_tokens,
            preset=p.name,
            request_overhead_s=p.request_overhead_s,
            overhead_per_prompt_token_s=p.overhead_per_prompt_token_s,
            step_time=step_time,
            scheduling_policy=scheduling_policy,
        )

    def build(self) -> EngineConfig:
        if self.preset is not None:
            p = get_preset(self.preset)
            return EngineConfig.from_capacity(
                self.kv_capacity_tokens or p.kv_capacity_tokens,
                block_size=self.block_size,
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                step_time=self.step_time or p.step_time,
                scheduling_policy=self.scheduling_policy,
            )
        return engine_config(
            self.model,
            self.gpu,
            self.tp,
            self.kv_capacity_tokens,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            scheduling_policy=self.scheduling_policy,
        )

    def request_overhead(self, prompt_tokens: int) -> float:
        """Seconds a request of ``prompt_tokens`` spends outside the engine's steps."""
        return self.request_overhead_s + self.overhead_per_prompt_token_s * prompt_tokens

    def describe(self) -> str:
        cap = self.build().kv_capacity_tokens
        sched = ", priority scheduler" if self.scheduling_policy == "priority" else ""
        if self.preset is not None:
            what = get_preset(self.preset).description
            again = f", step time refitted ({self.step_time.name})" if self.step_time else ""
            return f"preset {self.preset} ({what}){again}, KV capacity {cap:,} tokens{sched}"
        return f"{self.model} on {self.tp} x {self.gpu}, KV capacity {cap:,} tokens{sched}"
