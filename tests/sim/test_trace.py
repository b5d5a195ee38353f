"""The native JSONL trace format: schema, round trip, line-numbered errors, summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from concur.sim.generate import generate
from concur.sim.trace import (
    AgentTrace,
    SharedPrefix,
    Step,
    Trace,
    TraceError,
    dump_trace,
    load_trace,
    parse_trace,
    summarize,
    to_jsonl,
)


def agent_line(**changes: Any) -> str:
    """One valid agent line, with top-level fields replaced or removed (value None)."""
    obj: dict[str, Any] = {
        "agent_id": "a1",
        "arrival_s": 1.5,
        "shared_prefix": {"id": "sys", "tokens": 100},
        "steps": [
            {"input_tokens": 300, "output_tokens": 50, "tool_latency_s": 2.0},
            {"input_tokens": 40, "output_tokens": 20, "tool_latency_s": 0.0},
        ],
    }
    for key, value in changes.items():
        if value is None:
            obj.pop(key)
        else:
            obj[key] = value
    return json.dumps(obj)


def test_parse_reads_fields_and_defaults() -> None:
    line = '{"agent_id": "x", "arrival_s": 0, "steps": [{"input_tokens": 5, "output_tokens": 1}]}'
    trace = parse_trace([line], "t.jsonl")
    (agent,) = trace.agents
    assert agent == AgentTrace(
        agent_id="x", arrival_s=0.0, steps=(Step(input_tokens=5, output_tokens=1),)
    )
    assert agent.shared_prefix is None
    assert agent.steps[0].tool_latency_s == 0.0


def test_round_trip_through_text_and_file(tmp_path: Path) -> None:
    trace = generate("small", seed=3)
    assert parse_trace(to_jsonl(trace).splitlines(), "mem") == trace
    path = tmp_path / "trace.jsonl"
    dump_trace(trace, path)
    assert load_trace(path) == trace
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == len(trace.agents)
    first = json.loads(text.splitlines()[0])
    assert set(first) == {"agent_id", "arrival_s", "shared_prefix", "steps"}


def test_no_shared_prefix_is_omitted_when_written() -> None:
    trace = Trace(
        agents=(
            AgentTrace(agent_id="a", arrival_s=0, steps=(Step(input_tokens=1, output_tokens=1),)),
        )
    )
    assert "shared_prefix" not in to_jsonl(trace)


def test_blank_lines_are_ignored_and_numbers_still_count() -> None:
    lines = ["", agent_line(agent_id="a"), "   ", agent_line(agent_id="b"), ""]
    assert [a.agent_id for a in parse_trace(lines, "t").agents] == ["a", "b"]
    with pytest.raises(TraceError) as info:
        parse_trace(["", "", "{oops"], "t.jsonl")
    assert info.value.line == 3


def test_agents_sorted_by_arrival_then_id() -> None:
    lines = [
        agent_line(agent_id="c", arrival_s=2.0),
        agent_line(agent_id="b", arrival_s=1.0),
        agent_line(agent_id="a", arrival_s=2.0),
    ]
    assert [a.agent_id for a in parse_trace(lines, "t").agents] == ["b", "a", "c"]


BAD_LINES = [
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "must be a JSON object"),
    (agent_line(agent_id=None), "agent_id", "required field is missing"),
    (agent_line(steps=None), "steps", "required field is missing"),
    (agent_line(arrival_s=-0.5), "arrival_s", "must be >= 0.0, got -0.5"),
    (agent_line(arrival_s="soon"), "arrival_s", "must be a number, got 'soon'"),
    (agent_line(agent_id=""), "agent_id", "must be a non-empty string"),
    (agent_line(steps=[]), "steps", "must have at least 1 item(s), got 0"),
    (
        agent_line(steps=[{"input_tokens": 5, "output_tokens": 0}]),
        "steps.0.output_tokens",
        "must be >= 1, got 0",
    ),
    (
        agent_line(steps=[{"input_tokens": 5, "output_tokens": 1, "tool_latency_s": -1}]),
        "steps.0.tool_latency_s",
        "must be >= 0.0, got -1",
    ),
    (
        agent_line(steps=[{"input_tokens": 2.5, "output_tokens": 1}]),
        "steps.0.input_tokens",
        "must be an integer, got 2.5",
    ),
    (
        agent_line(steps=[{"input_tokens": 5, "output_tokens": 1, "latency": 1}]),
        "steps.0.latency",
        "unknown field (allowed: input_tokens, output_tokens, tool_latency_s)",
    ),
    (agent_line(extra=1), "extra", "unknown field (allowed: agent_id, arrival_s,"),
    (
        agent_line(shared_prefix={"id": "sys", "tokens": 301}),
        "shared_prefix.tokens",
        "must be <= steps.0.input_tokens (300), got 301",
    ),
    (agent_line(shared_prefix={"id": "sys", "tokens": 0}), "shared_prefix.tokens", ">= 1"),
    (agent_line(shared_prefix={"tokens": 10}), "shared_prefix.id", "required field is missing"),
]


@pytest.mark.parametrize(("line", "field", "detail"), BAD_LINES)
def test_bad_line_names_file_line_and_field(line: str, field: str | None, detail: str) -> None:
    lines = [agent_line(agent_id="ok"), "", line]
    with pytest.raises(TraceError) as info:
        parse_trace(lines, "trace.jsonl")
    error = info.value
    assert error.line == 3
    assert error.field == field
    assert detail in str(error)
    prefix = "trace.jsonl line 3: " + (f"{field}: " if field else "")
    assert str(error).startswith(prefix)


def test_exact_message_format() -> None:
    steps = [{"input_tokens": 9, "output_tokens": 1}] * 2 + [
        {"input_tokens": 9, "output_tokens": 0}
    ]
    lines = [agent_line(agent_id=f"a{i}") for i in range(6)] + [agent_line(steps=steps)]
    with pytest.raises(
        TraceError, match=r"^trace\.jsonl line 7: steps\.2\.output_tokens: must be >= 1, got 0$"
    ):
        parse_trace(lines, "trace.jsonl")


def test_duplicate_agent_id_names_both_lines() -> None:
    lines = [agent_line(agent_id="a"), agent_line(agent_id="b"), agent_line(agent_id="a")]
    with pytest.raises(TraceError) as info:
        parse_trace(lines, "t.jsonl")
    assert info.value.line == 3
    assert info.value.field == "agent_id"
    assert "duplicate agent id 'a' (first seen on line 1)" in str(info.value)


def test_shared_prefix_id_must_keep_one_length() -> None:
    lines = [
        agent_line(agent_id="a", shared_prefix={"id": "sys", "tokens": 100}),
        agent_line(agent_id="b", shared_prefix={"id": "sys", "tokens": 120}),
    ]
    with pytest.raises(TraceError) as info:
        parse_trace(lines, "t.jsonl")
    assert info.value.line == 2
    assert "'sys' has 100 tokens on line 1, got 120" in str(info.value)


def test_empty_trace_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no agents"):
        parse_trace(["", "  "], "empty.jsonl")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TraceError, match="cannot read trace file") as info:
        load_trace(missing)
    assert str(missing) in str(info.value)


def test_models_are_frozen_and_validated_directly() -> None:
    step = Step(input_tokens=1, output_tokens=1)
    with pytest.raises(ValidationError):
        step.input_tokens = 3  # type: ignore[misc]
    one = AgentTrace(agent_id="a", arrival_s=0, steps=(step,))
    with pytest.raises(ValidationError, match="duplicate agent_id"):
        Trace(agents=(one, one))
    with pytest.raises(ValidationError):
        Trace(agents=())
    with pytest.raises(ValidationError, match=r"must be <= steps\.0\.input_tokens"):
        AgentTrace(
            agent_id="a",
            arrival_s=0,
            shared_prefix=SharedPrefix(id="p", tokens=2),
            steps=(step,),
        )


def test_agent_helpers() -> None:
    agent = AgentTrace(
        agent_id="a",
        arrival_s=0,
        steps=(
            Step(input_tokens=100, output_tokens=10, tool_latency_s=1.0),
            Step(input_tokens=20, output_tokens=5, tool_latency_s=2.0),
            Step(input_tokens=30, output_tokens=7, tool_latency_s=9.0),
        ),
    )
    assert agent.prompt_tokens == (100, 130, 165)
    assert agent.max_prompt_tokens == 165
    assert agent.total_input_tokens == 150
    assert agent.total_output_tokens == 22
    assert agent.total_tokens == agent.max_context_tokens == 172
    assert agent.total_tool_latency_s == 3.0  # the last step's pause is ignored


def test_summary_numbers() -> None:
    prefix = SharedPrefix(id="sys", tokens=50)
    trace = Trace(
        agents=(
            AgentTrace(
                agent_id="a",
                arrival_s=0.5,
                shared_prefix=prefix,
                steps=(
                    Step(input_tokens=100, output_tokens=10, tool_latency_s=1.0),
                    Step(input_tokens=20, output_tokens=5),
                ),
            ),
            AgentTrace(
                agent_id="b",
                arrival_s=3.0,
                shared_prefix=prefix,
                steps=(Step(input_tokens=60, output_tokens=4),),
            ),
        )
    )
    summary = summarize(trace)
    assert (summary.agents, summary.steps, summary.min_steps, summary.max_steps) == (2, 3, 1, 2)
    assert summary.total_input_tokens == 180
    assert summary.total_output_tokens == 19
    assert summary.peak_context_tokens == 135
    assert summary.max_prompt_tokens == 130
    assert (summary.first_arrival_s, summary.last_arrival_s) == (0.5, 3.0)
    assert summary.arrival_span_s == 2.5
    assert summary.total_tool_latency_s == 1.0
    assert summary.shared_prefixes == 1
    assert summary.prefill_tokens_no_cache == 100 + 130 + 60
    assert summary.prefill_tokens_ideal == 180 - 50
    text = "\n".join(summary.lines())
    assert "agents: 2" in text
    assert "steps: 3 (1-2 per agent, mean 1.5)" in text
