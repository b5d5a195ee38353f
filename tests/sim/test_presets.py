"""Measured engine presets: the real engine's shape, step time and serving overhead."""

from __future__ import annotations

import pytest

from concur.policies import build_policy
from concur.sim.engine import EngineModel
from concur.sim.engine_config import PRESETS, EngineSpec
from concur.sim.generate import generate
from concur.sim.runner import Runner
from concur.sim.steptime import MeasuredStepTime


def test_the_cpu_preset_is_the_real_servers_shape() -> None:
    spec = EngineSpec.from_preset("cpu-tiny")
    config = spec.build()
    # vLLM's CPU backend: 128-token blocks, 2,048-token budget, 128 sequences; 256 blocks.
    assert (config.block_size, config.num_blocks) == (128, 256)
    assert config.kv_capacity_tokens == 32_768
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (2048, 128)
    assert isinstance(config.step_time, MeasuredStepTime)
    assert config.step_time == PRESETS["cpu-tiny"].step_time
    assert "cpu-tiny" in spec.describe() and "32,768" in spec.describe()
    bigger = EngineSpec.from_preset("cpu-tiny", kv_capacity_tokens=65_536).build()
    assert bigger.num_blocks == 512


def test_an_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown engine preset 'gpu-huge'.*cpu-tiny"):
        EngineSpec.from_preset("gpu-huge")


def test_the_serving_overhead_delays_every_request_of_an_agent() -> None:
    trace = generate("tiny", 1, agents=1, steps=(4, 4))
    spec = EngineSpec.from_preset("cpu-tiny")
    steps = len(trace.agents[0].steps)

    def makespan(overhead: bool) -> float:
        runner = Runner(
            trace,
            EngineModel(spec.build()),
            build_policy("unlimited"),
            block_size=spec.block_size,
            request_overhead=spec.request_overhead if overhead else None,
        )
        return runner.run().summary.makespan_s

    prompts = sum(  # what each step sends: the whole context so far plus its new input
        sum(s.input_tokens + s.output_tokens for s in trace.agents[0].steps[:k])
        + trace.agents[0].steps[k].input_tokens
        for k in range(steps)
    )
    expected = steps * spec.request_overhead_s + prompts * spec.overhead_per_prompt_token_s
    assert makespan(True) - makespan(False) == pytest.approx(expected, abs=1e-3)


def test_a_refitted_step_time_replaces_the_presets_and_says_so() -> None:
    faster = MeasuredStepTime(
        base_s=0.0005,
        per_token_s=4e-6,
        per_seq_s=3e-5,
        per_pair_s=3e-9,
        per_kv_s=4e-8,
        frontend_per_seq_s=0.0008,
        name="measured today",
    )
    spec = EngineSpec.from_preset("cpu-tiny", step_time=faster)
    assert spec.build().step_time is faster
    assert "refitted (measured today)" in spec.describe()
    stored = EngineSpec.from_preset("cpu-tiny")
    assert stored.build().step_time is PRESETS["cpu-tiny"].step_time
    assert "refitted" not in stored.describe()
