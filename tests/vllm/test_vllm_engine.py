"""VllmEngine: vLLM's own V1 scheduler behind the runner's engine interface.

Runs only with the vllm extra: ``make test-vllm`` (``pytest -m vllm``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from concur.policies.registry import PolicySettings, build_policy
from concur.sim.blocks import TokenSeq, VirtualSegment, output_segment
from concur.sim.engine import EngineModel, EngineRequest, FinishedRequest, StepResult
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.runner import Runner

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BS = 16


def _spec(kv_tokens: int = BS * 400, **kw: Any) -> EngineSpec:
    return EngineSpec(model="llama-3-8b", gpu="h100", tp=1, kv_capacity_tokens=kv_tokens, **kw)


@pytest.fixture(scope="module")
def make_engine() -> Iterator[Callable[..., Any]]:
    """Builds VllmEngines (vLLM is imported once per module)."""
    from concur.sim.vllm_engine import VllmEngine

    yield lambda spec: VllmEngine(spec)


def _drain(engine: Any, now: float = 0.0) -> tuple[list[StepResult], float]:
    steps: list[StepResult] = []
    while engine.has_work():
        res = engine.step(now)
        steps.append(res)
        now = res.end
    return steps, now


def _finished(steps: list[StepResult]) -> dict[str, FinishedRequest]:
    return {f.request_id: f for s in steps for f in s.finished}


def test_single_request_prefills_in_chunks_then_decodes(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(_spec(max_num_batched_tokens=64, max_num_seqs=4))
    prompt = TokenSeq([VirtualSegment("a:in0", 100)], BS)
    engine.add_request(EngineRequest("a#0", prompt, max_tokens=5), 0.0)
    steps, _ = _drain(engine)

    # 100 prompt tokens in chunks of 64 + 36 (the second samples the first token),
    # then one step per remaining output token.
    assert [s.scheduled_tokens for s in steps] == [64, 36, 1, 1, 1, 1]
    assert [s.prefill_tokens for s in steps] == [64, 36, 0, 0, 0, 0]
    assert [s.outputs.get("a#0", 0) for s in steps] == [0, 1, 1, 1, 1, 1]
    assert all(s.duration > 0 for s in steps)
    fin = _finished(steps)["a#0"]
    assert (fin.prompt_tokens, fin.output_tokens, fin.kv_tokens) == (100, 5, 104)
    assert (fin.prefill_tokens, fin.cached_tokens, fin.preemptions) == (100, 0, 0)
    assert fin.first_token_step == 1
    assert engine.stats.steps == 6
    assert engine.stats.decode_tokens == 4
    assert engine.stats.output_tokens == 5
    # The roofline is the built-in engine's: same steps, same clock.
    builtin = EngineModel(_spec(max_num_batched_tokens=64, max_num_seqs=4).build())
    builtin.add_request(EngineRequest("a#0", prompt, max_tokens=5), 0.0)
    b_steps, _ = _drain(builtin)
    assert [s.duration for s in b_steps] == [s.duration for s in steps]


def test_second_step_hits_the_whole_previous_context(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(_spec())
    first = TokenSeq([VirtualSegment("a:in0", 96)], BS)
    engine.add_request(EngineRequest("a#0", first, max_tokens=17), 0.0)
    steps, now = _drain(engine)
    fin0 = _finished(steps)["a#0"]
    assert fin0.kv_tokens == 96 + 17 - 1 == 7 * BS

    # The agent re-sends its context: prompt + exactly the outputs it got + new input.
    second = first.extended(output_segment("a#0", 17), VirtualSegment("a:in1", 40))
    engine.add_request(EngineRequest("a#1", second, 5, fin0.kv_tokens), now)
    steps, now = _drain(engine, now)
    fin1 = _finished(steps)["a#1"]
    assert fin1.cached_tokens == fin0.kv_tokens  # every computed token of step 0
    assert fin1.prefill_tokens == len(second) - fin0.kv_tokens
    assert fin1.recomputed_tokens == 0

    # Control: a prompt whose "outputs" are other ids hits only the first prompt.
    other = first.extended(output_segment("b#0", 17), VirtualSegment("a:in2", 40))
    engine.add_request(EngineRequest("x#0", other, 5), now)
    steps, _ = _drain(engine, now)
    assert _finished(steps)["x#0"].cached_tokens == 96

    sig = engine.signal(now)
    assert sig.prefix_queries_total == len(first) + len(second) + len(other)
    assert sig.prefix_hits_total == fin0.kv_tokens + 96


def _overcommit(engine: Any) -> tuple[list[StepResult], float]:
    # 19 usable blocks; three requests of 6 blocks each are admitted, then grow to
    # 13 blocks each while decoding.
    for i in range(3):
        prompt = TokenSeq([VirtualSegment(f"r{i}:in0", 96)], BS)
        engine.add_request(EngineRequest(f"r{i}#0", prompt, max_tokens=100), 0.0)
    return _drain(engine)


def test_overcommitted_run_preempts_and_recomputes(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(_spec(kv_tokens=BS * 20))
    steps, now = _overcommit(engine)
    fin = _finished(steps)
    assert sorted(fin) == ["r0#0", "r1#0", "r2#0"]
    assert all(f.output_tokens == 100 for f in fin.values())
    preempted = [rid for s in steps for rid in s.preempted]
    assert preempted, "an over-committed engine must preempt"
    stats = engine.stats
    assert stats.preemptions == len(preempted) == sum(f.preemptions for f in fin.values())
    assert stats.recomputed_tokens > 0
    assert stats.recomputed_tokens == sum(f.recomputed_tokens for f in fin.values())
    assert engine.signal(now).preemptions_total == stats.preemptions
    # The built-in model preempts the same requests at the same steps.
    builtin = EngineModel(_spec(kv_tokens=BS * 20).build())
    b_steps, _ = _overcommit(builtin)
    assert [s.preempted for s in b_steps] == [s.preempted for s in steps]


def test_signal_matches_the_schedulers_own_counters(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(_spec(kv_tokens=BS * 20))
    sched = engine.scheduler
    for i in range(3):
        prompt = TokenSeq([VirtualSegment("sys", 48), VirtualSegment(f"r{i}:in0", 48)], BS)
        engine.add_request(EngineRequest(f"r{i}#0", prompt, max_tokens=100), 0.0)
    now = 0.0
    seen: list[tuple[float, int, int]] = []
    finished: list[FinishedRequest] = []
    while engine.has_work():
        res = engine.step(now)
        now = res.end
        finished.extend(res.finished)
        sig = engine.signal(now)
        running, waiting = sched.get_request_counts()
        assert sig.kv_usage == pytest.approx(sched.get_kv_cache_usage())
        assert sig.kv_usage == pytest.approx(sched.kv_cache_manager.block_pool.get_usage())
        assert (sig.running, sig.waiting) == (running, waiting)
        assert sig.kv_capacity_tokens == 20 * BS
        seen.append((sig.kv_usage, running, waiting))
    assert any(w > 0 for _, _, w in seen), "some request must have waited"
    sig = engine.signal(now)
    assert sig.kv_usage == 0.0
    # Counters: first admissions only, in tokens, as vLLM's Prometheus logger counts.
    assert sig.prefix_queries_total == 3 * 96
    assert sig.prefix_hits_total == sum(f.cached_tokens for f in finished)
    assert sig.prefix_hits_total >= 2 * 48  # the shared 48-token prefix (3 blocks)
    assert sig.preemptions_total == sum(f.preemptions for f in finished) > 0
    assert engine.stats.prefix_hits == sig.prefix_hits_total


def _run_small(engine: Any, policy: str) -> dict[str, Any]:
    runner = Runner(generate("tiny", 3), engine, build_policy(policy, PolicySettings()))
    return runner.run().summary.to_dict()


def test_small_trace_gives_the_same_summary_twice(make_engine: Callable[..., Any]) -> None:
    spec = _spec(kv_tokens=BS * 300)
    first = _run_small(make_engine(spec), "aimd")
    second = _run_small(make_engine(spec), "aimd")
    assert first == second
    assert first["finished_agents"] == first["agents"] == 8
    assert first["prefix_hit_rate"] > 0
    # The built-in model is held to vLLM: same makespan within 15% on this trace.
    builtin = _run_small(EngineModel(spec.build()), "aimd")
    assert builtin["makespan_s"] == pytest.approx(first["makespan_s"], rel=0.15)


# (name, prompt tokens, max_tokens, priority, added before step): more than the cache
# holds, so both engines preempt, and late requests of low priority values overtake.
_PRIORITY_SWARM = (
    ("a", 40, 60, 5, 0),
    ("b", 50, 60, 3, 0),
    ("c", 30, 80, 0, 3),
    ("d", 20, 50, 1, 10),
    ("e", 60, 40, 0, 20),
    ("f", 35, 45, 2, 24),
)


def _priority_run(engine: Any) -> list[StepResult]:
    todo = sorted(_PRIORITY_SWARM, key=lambda r: r[4])
    steps: list[StepResult] = []
    now = 0.0
    while todo or engine.has_work():
        while todo and todo[0][4] <= len(steps):
            name, prompt, out, prio, _ = todo.pop(0)
            seq = TokenSeq([VirtualSegment(f"{name}:in0", prompt)], BS)
            engine.add_request(EngineRequest(f"{name}#0", seq, out, priority=prio), now)
        res = engine.step(now)
        steps.append(res)
        now = res.end
    return steps


def _schedule(steps: list[StepResult]) -> list[tuple[Any, ...]]:
    return [
        (s.admitted, s.preempted, s.scheduled_tokens, s.prefill_tokens, s.decode_tokens)
        for s in steps
    ]


def test_priority_scheduler_matches_vllms(make_engine: Callable[..., Any]) -> None:
    spec = _spec(kv_tokens=BS * 20, scheduling_policy="priority")
    real = _priority_run(make_engine(spec))
    builtin = _priority_run(EngineModel(spec.build()))
    # Step by step: the same admissions, the same victims, the same tokens scheduled.
    assert _schedule(builtin) == _schedule(real)
    assert {f.request_id for s in real for f in s.finished} == {
        f"{r[0]}#0" for r in _PRIORITY_SWARM
    }
    assert sum(len(s.preempted) for s in real) > 0
    # The swarm tells the two policies apart: first come first served differs.
    fcfs = _priority_run(EngineModel(_spec(kv_tokens=BS * 20).build()))
    assert _schedule(fcfs) != _schedule(real)
