"""The runner: same gate and policies as the proxy, deterministic, golden summaries."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from concur import admission, control
from concur.policies import AIMD, build_policy
from concur.sim.batch import Job, run_job, run_jobs
from concur.sim.engine import EngineModel, EngineRequest
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.runner import Runner, RunOptions
from concur.sim.trace import Trace

GOLDEN = Path(__file__).with_name("golden_small.json")
POLICIES = ("unlimited", "static:4", "aimd", "aimd:kv", "aimd:paper", "fit", "epp")
ENGINE = EngineSpec(model="qwen3-32b", gpu="h100", tp=2, kv_capacity_tokens=80_000)


def small_swarm(seed: int = 3) -> Trace:
    """16 agents whose contexts (up to ~20k tokens) outgrow an 80k-token cache."""
    return generate(
        "swe-swarm",
        seed,
        agents=16,
        steps=(6, 10),
        first_input_tokens=(3000, 5000),
        shared_prefix_tokens=1024,
        input_tokens=(500, 2000),
        output_tokens=(100, 300),
        tool_latency_median_s=1.0,
    )


def run(spec: str, trace: Trace | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
    return run_job(
        Job(label=spec, spec=spec, trace=trace or small_swarm(), engine=ENGINE, seed=seed)
    )


def test_runner_drives_the_proxys_own_gate_and_policy_classes() -> None:
    policy = build_policy("aimd")
    runner = Runner(small_swarm(), EngineModel(ENGINE.build()), policy)
    assert type(runner.gate) is admission.AdmissionGate
    assert type(runner.controller) is control.Controller
    assert runner.controller.policy is policy and isinstance(policy, AIMD)


class _Recording(EngineModel):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec.build())
        self.sent: list[EngineRequest] = []

    def add_request(self, req: EngineRequest, now: float) -> None:
        self.sent.append(req)
        super().add_request(req, now)


@pytest.mark.parametrize(
    ("spec", "stamp", "stamped"),
    [
        ("aimd", True, True),
        ("static:4", True, True),
        ("unlimited", True, False),
        ("aimd", False, False),
    ],
)
def test_steps_carry_their_agents_steps_done_as_the_proxy_stamps_them(
    spec: str, stamp: bool, stamped: bool
) -> None:
    engine = _Recording(replace(ENGINE, scheduling_policy="priority"))
    Runner(
        small_swarm(), engine, build_policy(spec), options=RunOptions(engine_priority=stamp)
    ).run()
    assert len(engine.sent) == sum(len(a.steps) for a in small_swarm().agents)
    for req in engine.sent:
        step = int(req.request_id.rpartition("#")[2])
        assert req.priority == (step if stamped else 0), req.request_id


def test_a_priority_engine_changes_the_run() -> None:
    fcfs = run("static:8")
    by_priority = run_job(
        Job(
            label="static:8",
            spec="static:8",
            trace=small_swarm(),
            engine=replace(ENGINE, scheduling_policy="priority"),
        )
    )
    assert by_priority.summary.finished_agents == fcfs.summary.finished_agents
    assert by_priority.summary.makespan_s != fcfs.summary.makespan_s


@pytest.mark.parametrize("spec", POLICIES)
def test_every_agent_finishes_and_the_gate_drains(spec: str) -> None:
    trace = small_swarm()
    policy = build_policy(spec)
    runner = Runner(trace, EngineModel(ENGINE.build()), policy)
    result = runner.run()
    s = result.summary
    assert s.finished_agents == s.agents == 16
    assert s.output_tokens == sum(a.total_output_tokens for a in trace.agents)
    assert (runner.gate.active, runner.gate.queued) == (0, 0)
    assert result.samples and result.samples[0].t == 0.0


def test_same_seed_same_summary_different_trace_seed_differs() -> None:
    a = run("aimd").summary
    b = run("aimd").summary
    assert a == b
    c = run("aimd", small_swarm(seed=4)).summary
    assert c != a


def test_control_beats_no_control_on_a_thrashing_swarm() -> None:
    base = run("unlimited").summary
    aimd = run("aimd").summary
    assert base.recompute_share > 0.3
    assert aimd.prefix_hit_rate > base.prefix_hit_rate
    assert aimd.makespan_s < base.makespan_s


def test_parallel_processes_give_the_same_results_in_order() -> None:
    trace = small_swarm()
    jobs = [Job(label=s, spec=s, trace=trace, engine=ENGINE) for s in ("unlimited", "aimd")]
    seen: list[tuple[str, int, int]] = []
    par = run_jobs(jobs, workers=2, progress=lambda *a: seen.append(a))
    seq = run_jobs(jobs, workers=1)
    assert [r.summary for r in par] == [r.summary for r in seq]
    assert ("aimd", 16, 16) in seen


def test_golden_summaries() -> None:
    """Summaries of a small trace per policy, pinned. Regenerate with UPDATE_GOLDEN=1."""
    got = {spec: run(spec).summary.to_dict() for spec in POLICIES}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got == want
