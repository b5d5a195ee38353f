"""A first simulator run that shows control: the small shape on the default engine, a
policy set sized to the trace, and a closing text that says what was held back, what to
look at and, when nothing was under pressure, which --kv-tokens would change that."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from concur.cli import main
from concur.sim.batch import Job, run_job
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.guide import (
    HeldBack,
    closing_text,
    default_policies,
    held_back,
    kv_tokens_hint,
    peak_working_set,
    static_cap,
)
from concur.sim.runner import RunResult, Sample, Summary
from concur.sim.trace import AgentTrace, Step, Trace

DEFAULT_ENGINE = EngineSpec(model="qwen3-32b", gpu="h100", tp=2)
"""``concur sim run``'s engine without flags."""
CAPACITY = DEFAULT_ENGINE.build().kv_capacity_tokens


def _trace(agents: int, context: int) -> Trace:
    return Trace(
        agents=tuple(
            AgentTrace(
                agent_id=f"a{i}",
                arrival_s=0.0,
                steps=(Step(input_tokens=context - 10, output_tokens=10),),
            )
            for i in range(agents)
        )
    )


def test_the_default_set_leaves_out_a_static_cap_that_never_binds() -> None:
    # 10 agents of 10k tokens: a 100k cache holds all of them, a 50k one five.
    assert static_cap(_trace(10, 10_000), 100_000) is None
    assert default_policies(_trace(10, 10_000), 100_000) == [
        "unlimited",
        "aimd:paper",
        "aimd:cache",
        "aimd",
    ]
    assert static_cap(_trace(10, 10_000), 50_000) == 5
    assert "static:5" in default_policies(_trace(10, 10_000), 50_000)
    # The tiny test shape on the default engine: no cap, and never the old static:32.
    tiny = default_policies(generate("tiny", 0), CAPACITY)
    assert not [p for p in tiny if p.startswith("static:")]
    small = generate("small", 0)
    policies = default_policies(small, CAPACITY)
    caps = [int(p.split(":")[1]) for p in policies if p.startswith("static:")]
    assert len(caps) == 1 and 1 <= caps[0] < len(small.agents)
    assert len(policies) <= 5 and "aimd" in policies and "aimd:cache" in policies


def test_sim_gen_small_then_sim_run_shows_control(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "small.jsonl"
    assert main(["sim", "gen", "small", "--out", str(trace)]) == 0
    out = tmp_path / "report"
    code = main(
        ["sim", "run", "--trace", str(trace), "--out", str(out), "--jobs", "1", "--no-plots"]
    )
    assert code == 0
    data = json.loads((out / "summary.json").read_text())
    runs = {p["summary"]["policy"]: p["summary"] for p in data["policies"]}
    assert len(runs) <= 5 and "static:32" not in runs
    base, aimd = runs["unlimited"], runs["aimd"]
    # Without control the cache thrashes; the default law holds agents back and keeps
    # their prefixes cached.
    assert base["recompute_share"] > 0.3
    assert aimd["max_pauses"] > 0 or aimd["mean_queue_wait_s"] > 0
    assert aimd["prefix_hit_rate"] > base["prefix_hit_rate"] + 0.2
    text = (out / "summary.md").read_text()
    held = re.search(r"aimd held up to (\d+) agents back at once", text)
    assert held is not None and int(held.group(1)) > 0
    assert "What to look at" in text and "--kv-tokens" not in text
    printed = capsys.readouterr().out
    assert "What to look at" in printed and "static:32" not in printed


def _quick(spec: str, trace: Trace, kv_tokens: int | None = None) -> RunResult:
    engine = EngineSpec(model="qwen3-32b", gpu="h100", tp=2, kv_capacity_tokens=kv_tokens)
    return run_job(Job(label=spec, spec=spec, trace=trace, engine=engine))


def test_no_pressure_suggests_a_smaller_cache_that_puts_the_agents_under_pressure() -> None:
    trace = generate("tiny", 0)
    results = [_quick("unlimited", trace), _quick("aimd", trace)]
    peak = peak_working_set(results, CAPACITY)
    assert peak is not None and 0 < peak < 0.1 * CAPACITY
    longest = max(a.max_context_tokens for a in trace.agents)
    kv = kv_tokens_hint(peak, longest)
    text = closing_text(results, CAPACITY, trace)
    assert "never came under pressure" in text
    assert f"`--kv-tokens {kv}`" in text and f"{peak:,} tokens" in text
    # The suggestion is concrete and right: with it, no control overflows the cache.
    smaller = _quick("unlimited", trace, kv)
    over = max(x.working_set or 0.0 for x in smaller.samples)
    assert over > 1.0, over
    # Under pressure there is no such hint.
    small = generate("small", 0)
    busy = [_quick("unlimited", small), _quick("aimd", small)]
    assert "--kv-tokens" not in closing_text(busy, CAPACITY, small)


def test_kv_tokens_hint_is_half_the_peak_but_room_for_the_longest_agent() -> None:
    assert kv_tokens_hint(11_736, 1_467) == 6_000
    assert kv_tokens_hint(4_000, 3_000) == 5_000  # 1.5 x the longest context, in thousands
    assert kv_tokens_hint(100, 50) == 1_000


def _summary(policy: str) -> Summary:
    return Summary(
        policy=policy,
        agents=4,
        finished_agents=4,
        makespan_s=10.0,
        output_tokens=1,
        prompt_tokens=1,
        output_tok_per_s=0.1,
        total_tok_per_s=0.2,
        prefix_hit_rate=0.5,
        preemptions=0,
        prefill_tokens=1,
        recomputed_tokens=0,
        recompute_share=0.0,
        mean_completion_s=1.0,
        p99_completion_s=1.0,
        mean_queue_wait_s=0.0,
        max_window=None,
        engine_steps=1,
    )


def _sample(t: float, window: int | None, paused: int, queued: int, reason: str) -> Sample:
    return Sample(
        t=t,
        kv_usage=None,
        hit_rate=None,
        window=window,
        live=2,
        paused=paused,
        queued=queued,
        pressure=None,
        working_set=None,
        running=None,
        waiting=None,
        reason=reason,
    )


def test_held_back_counts_pauses_queues_and_open_time_from_the_samples() -> None:
    samples = [
        _sample(0, 2, 0, 2, "hold"),
        _sample(1, 1, 1, 1, "decrease:pressure"),
        _sample(2, None, 0, 0, "open"),
        _sample(5, None, 0, 0, "open"),
        _sample(6, 3, 0, 0, "hold"),
    ]
    result = RunResult(_summary("aimd"), samples, {}, {})
    assert held_back(result) == HeldBack("aimd", most=2, paused=1, queued=2, open_s=4.0)
    text = closing_text([result], None)
    assert "aimd held up to 2 agents back at once" in text
    assert "up to 1 paused at step boundaries, up to 2 queued" in text
    assert "open (no limit) for 4 s" in text
