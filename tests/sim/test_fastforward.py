"""Fast-forwarded decode runs (``EngineModel.step_many``) give exactly what
stepping one by one gives: same finished requests (times included), same
engine counters, same block pool, and through the runner the same summaries,
samples and completion times. Equality is exact, floats included: a run of
steps adds its step durations one at a time, as the kernel does."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from concur.policies import build_policy
from concur.sim.blocks import BlockPool, TokenSeq, VirtualSegment, output_segment
from concur.sim.engine import (
    EngineConfig,
    EngineModel,
    EngineRequest,
    EngineStats,
    FinishedRequest,
    StepResult,
)
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.runner import Runner, RunResult
from concur.sim.steptime import StepTimeModel, build_step_time
from concur.sim.trace import Trace

V = VirtualSegment
ROOFLINE = build_step_time("qwen3-32b", "h100", 2)
ONE_SECOND = StepTimeModel(
    weight_bytes=0.0,
    kv_bytes_per_token=0.0,
    bandwidth=1.0,
    flops_per_token=0.0,
    flops=1.0,
    overhead_s=1.0,
)  # every step lasts exactly 1 s, so arrivals can be placed between given steps


# --------------------------------------------------------------- engine level

Arrival = tuple[float, EngineRequest]


@dataclasses.dataclass
class Drive:
    finished: list[tuple[float, FinishedRequest]]
    stats: EngineStats
    free_queue: list[int]
    cached_blocks: int
    calls: int
    steps: int
    results: list[StepResult]


def drive(cfg: EngineConfig, arrivals: Sequence[Arrival], *, many: bool) -> Drive:
    """Feed requests at their times and step until done, one step per call or
    with ``step_many`` up to the next arrival (as the runner does)."""
    eng = EngineModel(cfg)
    pending = sorted(arrivals, key=lambda a: a[0])
    now = 0.0
    finished: list[tuple[float, FinishedRequest]] = []
    results: list[StepResult] = []
    while pending or eng.has_work():
        while pending and pending[0][0] <= now:
            eng.add_request(pending.pop(0)[1], now)
        if not eng.has_work():
            now = pending[0][0]
            continue
        until = pending[0][0] if pending else math.inf
        res = eng.step_many(now, until) if many else eng.step(now)
        results.append(res)
        finished.extend((res.end, f) for f in res.finished)
        now = res.end
    pool = eng._sched.pool
    return Drive(
        finished,
        eng.stats,
        pool.free_queue(),
        pool.num_cached_blocks,
        len(results),
        eng.stats.steps,
        results,
    )


def assert_same(cfg: EngineConfig, arrivals: Sequence[Arrival]) -> tuple[Drive, Drive]:
    one = drive(cfg, arrivals, many=False)
    ff = drive(cfg, arrivals, many=True)
    assert ff.finished == one.finished
    assert ff.stats == one.stats
    assert ff.free_queue == one.free_queue
    assert ff.cached_blocks == one.cached_blocks
    assert one.calls == one.steps
    assert sum(r.num_steps for r in ff.results) == ff.steps
    return one, ff


def req(rid: str, prompt: int, out: int, *, shared: int = 0) -> EngineRequest:
    segs = [V("sys", shared)] if shared else []
    return EngineRequest(rid, TokenSeq([*segs, V(f"{rid}:in", prompt - shared)]), out)


CONFIGS = {
    "roofline": EngineConfig(num_blocks=400, step_time=ROOFLINE),
    "block-size-1": EngineConfig(num_blocks=6000, block_size=1, step_time=ROOFLINE),
    "no-prefix-caching": EngineConfig(
        num_blocks=400, step_time=ROOFLINE, enable_prefix_caching=False
    ),
    "watermark-and-seq-cap": EngineConfig(
        num_blocks=400, step_time=ROOFLINE, watermark=0.05, max_num_seqs=3
    ),
}


def _mixed(block_size: int) -> list[Arrival]:
    sizes = [(300, 90), (1000, 40), (517, 200), (64, 33), (2000, 150), (129, 7)]
    reqs = [
        EngineRequest(f"r{i}", TokenSeq([V("sys", 64), V(f"r{i}:in", p - 64)], block_size), out)
        for i, (p, out) in enumerate(sizes)
    ]
    return [
        (0.0, reqs[0]),
        (0.0, reqs[1]),
        (0.0, reqs[2]),
        (0.5, reqs[3]),
        (1.2, reqs[4]),
        (1.21, reqs[5]),
    ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_runs_match_stepping_one_by_one(name: str) -> None:
    cfg = CONFIGS[name]
    one, ff = assert_same(cfg, _mixed(cfg.block_size))
    assert len(one.finished) == 6
    # Runs really were fast-forwarded: far fewer calls than steps.
    assert ff.calls < one.calls / 3
    # A run never carries a finish except at its last step, and reports it there.
    finishing = [r for r in ff.results if r.finished]
    assert sum(len(r.finished) for r in finishing) == 6


def test_switched_off_it_is_one_step_per_call() -> None:
    cfg = dataclasses.replace(CONFIGS["roofline"], fast_forward=False)
    one, ff = assert_same(cfg, _mixed(16))
    assert ff.calls == one.calls
    assert all(r.num_steps == 1 for r in ff.results)


def test_growth_into_a_full_pool_preempts_at_the_same_step() -> None:
    # 8 requests of 200 tokens decode 300 tokens each into 60 usable blocks:
    # decode growth must preempt; a run stops before the step that would.
    cfg = EngineConfig(num_blocks=61, step_time=ROOFLINE, max_num_batched_tokens=512)
    arrivals = [(0.0, req(f"g{i}", 200, 300, shared=48)) for i in range(8)]
    one, ff = assert_same(cfg, arrivals)
    assert one.stats.preemptions > 5
    assert ff.calls < one.calls / 3
    assert any(r.preempted for r in ff.results)


def test_a_blocked_waiting_head_does_not_stop_the_run() -> None:
    # "big" cannot be admitted (whole sequence must fit) until "a" and "b" end.
    cfg = EngineConfig(num_blocks=80, step_time=ROOFLINE)
    arrivals = [
        (0.0, req("a", 400, 120)),
        (0.0, req("b", 300, 250)),
        (0.0, req("big", 900, 20)),
    ]
    one, ff = assert_same(cfg, arrivals)
    order = [f.request_id for _, f in one.finished]
    assert order == ["a", "b", "big"] or order == ["a", "big", "b"]
    assert ff.calls < one.calls / 5


def test_caching_a_watched_hash_reopens_admission_at_the_same_step() -> None:
    # "b" extends "a"'s prompt with a's first 48 outputs. It arrives while a
    # decodes inside its 5th block and is short of one block (the watermark
    # keeps one free); when a fills that block, b's cache hit grows by it and
    # b is admitted in that very step. A fast-forwarded run must stop right
    # before that step, although nothing else would end it before a finishes.
    cfg = EngineConfig(num_blocks=33, watermark=0.04, step_time=ONE_SECOND)
    a_prompt = TokenSeq([V("a:in", 64)])
    a = EngineRequest("a", a_prompt, 100)
    b = EngineRequest("b", a_prompt.extended(output_segment("a", 48), V("b:in", 380)), 5)
    one, ff = assert_same(cfg, [(0.0, a), (8.0, b)])
    # Step s >= 1 computes a's position 63 + s, so step 16 completes block 4.
    assert [r.start for r in one.results if r.admitted == ("b",)] == [16.0]
    assert [r.start for r in ff.results if r.admitted == ("b",)] == [16.0]
    assert [(t, f.request_id) for t, f in one.finished] == [(21.0, "b"), (100.0, "a")]
    assert one.stats.preemptions == 0
    assert ff.calls <= 6


def test_a_run_needs_the_blocked_check_to_still_hold() -> None:
    cfg = EngineConfig(num_blocks=80, step_time=ROOFLINE)
    eng = EngineModel(cfg)
    eng.add_request(req("a", 400, 120), 0.0)
    eng.add_request(req("big", 1000, 20), 0.0)
    eng.step(0.0)
    sched = eng._sched
    assert sched._blocked is not None and sched._blocked[0] is sched.waiting[0]
    assert sched.plan_decode() is not None
    pool = sched.pool
    pool.epoch += 1  # a hit could have grown: the next step re-checks the head
    assert sched.plan_decode() is None
    pool.epoch -= 1
    eng.add_request(req("small", 30, 5), 0.0)
    sched.waiting.rotate(1)  # a new head (as after a preemption) was never checked
    assert sched.plan_decode() is None
    sched.waiting.rotate(-1)
    assert sched.plan_decode() is not None
    big = sched.waiting[0]
    sched._blocked = (big, pool.epoch, pool.num_free_blocks)  # it would fit now
    assert sched.plan_decode() is None


def test_runs_start_strictly_before_until_and_stop_after_a_finish() -> None:
    cfg = EngineConfig(num_blocks=400, step_time=ONE_SECOND)
    eng = EngineModel(cfg)
    eng.add_request(req("x", 100, 50), 0.0)
    eng.add_request(req("y", 100, 20), 0.0)
    res = eng.step_many(0.0, until=7.0)
    assert (res.num_steps, res.start, res.end, res.finished) == (7, 0.0, 7.0, ())
    assert res.outputs == {"x": 7, "y": 7}
    assert res.decode_tokens == 12 and res.prefill_tokens == 200
    res = eng.step_many(7.0, until=7.5)  # the next step starts before 7.5: it runs alone
    assert res.num_steps == 1
    res = eng.step_many(8.0, until=math.inf)
    assert [f.request_id for f in res.finished] == ["y"]
    assert (res.num_steps, res.end) == (12, 20.0)  # y's 20th token comes from step 19
    assert res.finished[0].finish_time == 20.0
    res = eng.step_many(20.0, until=math.inf, min_duration=2.0)
    assert (res.num_steps, res.end) == (30, 80.0)  # each 1 s step counted as 2 s
    assert not eng.has_work()


def test_cache_block_is_cache_blocks_for_one_block() -> None:
    pools = [BlockPool(12), BlockPool(12)]
    for pool in pools:
        pool.watch([7, 8])
    blocks = pools[0].allocate(10)
    assert pools[1].allocate(10).tolist() == blocks.tolist()
    ids = [5, 6, 7, 5, 9, 7, 1, 2, 3, 6]  # duplicates of 5, 6 and 7; 7 is watched
    for b, cid in zip(blocks.tolist(), ids, strict=True):
        pools[0].cache_blocks(np.array([b]), np.array([cid]))
        pools[1].cache_block(b, cid)
    a, b = pools
    assert a._cached.tolist() == b._cached.tolist()
    assert (a._dups, a.epoch) == (b._dups, b.epoch)
    assert a.epoch == 2 and a._dups == {5: [blocks[3]], 7: [blocks[5]], 6: [blocks[9]]}


# --------------------------------------------------------------- runner level


class OneByOne:
    """An engine without ``step_many``: the runner steps it one step at a time."""

    def __init__(self, engine: EngineModel) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        if name == "step_many":
            raise AttributeError(name)
        return getattr(self._engine, name)


class Counting(EngineModel):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.calls = 0

    def step_many(self, now: float, until: float, min_duration: float = 0.0) -> StepResult:
        self.calls += 1
        return super().step_many(now, until, min_duration)


def _swarm(seed: int) -> Trace:
    return generate(
        "swe-swarm",
        seed,
        agents=12,
        steps=(4, 8),
        first_input_tokens=(3000, 5000),
        shared_prefix_tokens=1024,
        input_tokens=(500, 2000),
        output_tokens=(100, 300),
        tool_latency_median_s=1.0,
    )


TRACES = {
    "swarm": (_swarm(5), 60_000, 16),
    "staggered-swarm": (
        generate(
            "swe-swarm-staggered",
            2,
            agents=10,
            steps=(3, 6),
            first_input_tokens=(2500, 4000),
            input_tokens=(300, 1500),
            output_tokens=(50, 250),
            arrival_window_s=20.0,
        ),
        50_000,
        16,
    ),
    "chat-block-8": (generate("chat", 1, agents=20, arrival_window_s=10.0), 8_000, 8),
}
POLICIES = ("unlimited", "static:4", "aimd", "aimd:kv", "fit", "epp")


def _run(trace: Trace, engine: Any, spec: str, block_size: int) -> RunResult:
    return Runner(trace, engine, build_policy(spec), block_size=block_size).run()


def _config(kv_tokens: int, block_size: int) -> EngineConfig:
    spec = EngineSpec(kv_capacity_tokens=kv_tokens, block_size=block_size)
    return spec.build()


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("trace_name", sorted(TRACES))
def test_runner_summaries_are_identical_with_and_without(trace_name: str, spec: str) -> None:
    trace, kv_tokens, block_size = TRACES[trace_name]
    cfg = _config(kv_tokens, block_size)
    ff_engine = Counting(cfg)
    ff = _run(trace, ff_engine, spec, block_size)
    off_engine = EngineModel(dataclasses.replace(cfg, fast_forward=False))
    off = _run(trace, off_engine, spec, block_size)
    assert ff.summary == off.summary
    assert ff_engine.stats == off_engine.stats
    assert ff.completion_s == off.completion_s
    assert ff.samples == off.samples
    assert ff.summary.finished_agents == len(trace.agents)
    assert ff_engine.calls < ff_engine.stats.steps  # it did fast-forward


def test_an_engine_without_step_many_gives_the_same_run() -> None:
    trace, kv_tokens, block_size = TRACES["swarm"]
    cfg = _config(kv_tokens, block_size)
    plain = _run(trace, OneByOne(EngineModel(cfg)), "aimd", block_size)
    ff = _run(trace, EngineModel(cfg), "aimd", block_size)
    assert plain.summary == ff.summary
    assert plain.samples == ff.samples


def test_a_run_cut_by_max_time_counts_the_same_steps() -> None:
    from concur.sim.runner import RunOptions

    trace, kv_tokens, block_size = TRACES["swarm"]
    cfg = _config(kv_tokens, block_size)
    opts = RunOptions(max_time=40.0)
    runs = []
    for ff in (True, False):
        eng = EngineModel(dataclasses.replace(cfg, fast_forward=ff))
        res = Runner(trace, eng, build_policy("unlimited"), options=opts).run()
        runs.append((res.summary, eng.stats))
    assert runs[0] == runs[1]
    assert runs[0][0].finished_agents < len(trace.agents)
