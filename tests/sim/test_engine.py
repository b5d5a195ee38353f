"""The simulated engine end to end: steps, caching across an agent's requests,
preemption under over-commitment, signals, determinism."""

from __future__ import annotations

import pytest

from concur.sim.blocks import TokenSeq, VirtualSegment, output_segment
from concur.sim.engine import (
    EngineConfig,
    EngineModel,
    EngineRequest,
    FinishedRequest,
    StepResult,
    engine_config,
)
from concur.sim.steptime import build_step_time, kv_capacity_tokens

V = VirtualSegment


def run(engine: EngineModel, now: float = 0.0) -> tuple[float, list[StepResult]]:
    steps: list[StepResult] = []
    while engine.has_work():
        r = engine.step(now)
        steps.append(r)
        now = r.end
    return now, steps


def finished(steps: list[StepResult]) -> dict[str, FinishedRequest]:
    return {f.request_id: f for s in steps for f in s.finished}


def test_single_request_prefills_then_decodes() -> None:
    cfg = EngineConfig(num_blocks=101)
    eng = EngineModel(cfg)
    eng.add_request(EngineRequest("r", TokenSeq([V("p", 100)]), max_tokens=5), 1.0)
    end, steps = run(eng, 1.0)
    # One prefill step (100 <= 8192 budget) then four decode steps.
    assert [s.scheduled_tokens for s in steps] == [100, 1, 1, 1, 1]
    assert [s.prefill_tokens for s in steps] == [100, 0, 0, 0, 0]
    assert [s.decode_tokens for s in steps] == [0, 1, 1, 1, 1]
    assert all(s.outputs == {"r": 1} for s in steps)
    st = cfg.step_time
    assert steps[0].duration == st.duration(100, 100)
    assert steps[1].duration == st.duration(1, 101)
    assert steps[4].duration == st.duration(1, 104)
    f = steps[-1].finished[0]
    assert (f.prompt_tokens, f.output_tokens, f.cached_tokens, f.kv_tokens) == (100, 5, 0, 104)
    assert f.first_token_time == steps[0].end
    assert f.first_token_step == 0
    assert f.finish_time == end
    assert f.arrival_time == 1.0
    assert f.ttft == pytest.approx(steps[0].duration)
    s = eng.stats
    assert (s.steps, s.prefill_tokens, s.decode_tokens, s.output_tokens) == (5, 100, 4, 5)
    assert s.busy_time == pytest.approx(end - 1.0)


def test_agent_second_request_hits_its_whole_previous_context() -> None:
    eng = EngineModel(EngineConfig(num_blocks=101))
    p0 = TokenSeq([V("sys", 40), V("a:in0", 60)])
    eng.add_request(EngineRequest("a#0", p0, max_tokens=20), 0.0)
    now, steps = run(eng)
    f0 = finished(steps)["a#0"]
    assert f0.kv_tokens == 119  # 100 prompt + 20 output - 1 (last never fed back)

    # The runner's convention: previous prompt + its output + the new input.
    p1 = p0.extended(output_segment("a#0", 20), V("a:in1", 30))
    assert len(p1) == 150
    # All 7 full blocks the first request computed (119 // 16) are cached.
    assert eng.cached_prefix_tokens(p1) == 112
    eng.add_request(EngineRequest("a#1", p1, max_tokens=3, known_prefix_tokens=f0.kv_tokens), now)
    _, steps = run(eng, now)
    f1 = finished(steps)["a#1"]
    assert f1.cached_tokens == 112
    assert steps[0].scheduled_tokens == 150 - 112
    # Tokens 112..118 were computed before but sat in a partial block.
    assert f1.recomputed_tokens == 7
    s = eng.stats
    assert (s.prefix_queries, s.prefix_hits) == (250, 112)
    assert s.recomputed_tokens == 7


def test_agents_share_a_system_prompt() -> None:
    eng = EngineModel(EngineConfig(num_blocks=201))
    for a in ("x", "y"):
        eng.add_request(EngineRequest(a, TokenSeq([V("sys", 500), V(a, 100)]), 1), 0.0)
    _, steps = run(eng)
    fin = finished(steps)
    # x caches its blocks when scheduled, so y (admitted in the same step)
    # already hits the 31 full blocks of the system prompt, as in vLLM.
    assert fin["x"].cached_tokens == 0
    assert fin["y"].cached_tokens == 496
    assert steps[0].scheduled_tokens == 600 + 104


def test_over_committed_load_preempts_and_still_finishes() -> None:
    # 20 requests of 200-token prompts growing by 300 tokens each into 2,000
    # tokens of KV: admission only checks prompts, so growth forces preemption.
    eng = EngineModel(EngineConfig.from_capacity(2000))
    for i in range(20):
        eng.add_request(EngineRequest(f"r{i}", TokenSeq([V(f"p{i}", 200)]), 300), 0.0)
    _, steps = run(eng)
    fin = finished(steps)
    assert len(fin) == 20
    assert all(f.output_tokens == 300 for f in fin.values())
    s = eng.stats
    assert s.preemptions > 0
    assert s.preemptions == sum(len(st.preempted) for st in steps)
    assert s.preemptions == sum(f.preemptions for f in fin.values())
    assert s.recomputed_tokens == sum(f.recomputed_tokens for f in fin.values())
    assert s.recomputed_tokens > 0
    assert s.prefill_tokens == 20 * 200 + sum(
        f.prefill_tokens - f.prompt_tokens for f in fin.values()
    )
    sig = eng.signal(123.0)
    assert sig.preemptions_total == float(s.preemptions)
    assert sig.running == 0 and sig.waiting == 0


def test_kv_usage_counts_free_cached_blocks_as_free() -> None:
    eng = EngineModel(EngineConfig(num_blocks=65))
    prompt = TokenSeq([V("ctx", 300)])
    eng.add_request(EngineRequest("r", prompt, 2), 0.0)
    first = eng.step(0.0)
    # While running: 300 prompt tokens + 1 slot -> 19 of 64 usable blocks.
    assert eng.kv_usage == 19 / 64
    assert eng.signal(first.end).kv_usage == 19 / 64
    run(eng, first.end)
    # Finished: its 18 full blocks stay cached but count as free.
    assert eng.kv_usage == 0.0
    assert eng.cached_prefix_tokens(prompt.extended(V("more", 5))) == 288
    assert eng.stats.evicted_blocks == 0


def test_signal_matches_vllm_metric_fields() -> None:
    cfg = EngineConfig(num_blocks=1000, block_size=16)
    eng = EngineModel(cfg)
    for i in range(3):
        eng.add_request(EngineRequest(f"r{i}", TokenSeq([V("s", 64), V(f"u{i}", 36)]), 4), 0.0)
    sig0 = eng.signal(0.0)
    assert (sig0.running, sig0.waiting, sig0.kv_usage) == (0, 3, 0.0)
    assert sig0.kv_capacity_tokens == 16_000
    assert sig0.engines == 1
    assert sig0.prefix_queries_total == 0.0
    eng.step(0.0)
    sig = eng.signal(0.5)
    assert sig.timestamp == 0.5
    assert (sig.running, sig.waiting) == (3, 0)
    # 7 blocks each, the 4 blocks of the shared 64-token prefix held once.
    assert sig.kv_usage == pytest.approx((7 + 3 + 3) / 999)
    assert sig.prefix_queries_total == 300.0
    assert sig.prefix_hits_total == 2 * 64.0
    assert sig.hit_rate is None


def test_abort_and_validation() -> None:
    eng = EngineModel(EngineConfig(num_blocks=11))
    eng.add_request(EngineRequest("r", TokenSeq([V("p", 50)]), 10), 0.0)
    eng.step(0.0)
    assert eng.request("r") is not None
    assert eng.abort("r") is True
    assert eng.abort("r") is False
    assert not eng.has_work()
    assert eng.kv_usage == 0.0
    assert eng.stats.requests_aborted == 1
    empty = eng.step(1.0)
    assert (empty.duration, empty.scheduled_tokens, empty.outputs) == (0.0, 0, {})


def _workload(seed_shift: int) -> tuple[list[float], tuple[int, ...]]:
    eng = EngineModel(EngineConfig.from_capacity(4000, max_num_batched_tokens=512))
    for i in range(12):
        n = 100 + 37 * ((i + seed_shift) % 5)
        prompt = TokenSeq([V("sys", 64), V(f"a{i}", n)])
        eng.add_request(EngineRequest(f"r{i}", prompt, 40 + 11 * (i % 3)), 0.01 * i)
    _, steps = run(eng)
    s = eng.stats
    return [st.duration for st in steps], (
        s.steps,
        s.prefill_tokens,
        s.cached_tokens,
        s.preemptions,
        s.evicted_blocks,
    )


def test_same_input_same_run() -> None:
    a = _workload(0)
    assert a == _workload(0)
    assert a != _workload(1)


def test_engine_config_from_presets() -> None:
    cfg = engine_config("qwen3-32b", "h100", tp=2)
    expected = kv_capacity_tokens("qwen3-32b", "h100", tp=2)
    assert cfg.num_blocks == expected // 16
    assert cfg.kv_capacity_tokens == cfg.num_blocks * 16
    assert cfg.step_time == build_step_time("qwen3-32b", "h100", tp=2)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.reserve_full_isl) == (256, 8192, True)
    fixed = engine_config("llama-3-8b", "a100", 1, 300_000)
    assert fixed.kv_capacity_tokens == 300_000
    assert EngineConfig.from_capacity(1000).num_blocks == 62
