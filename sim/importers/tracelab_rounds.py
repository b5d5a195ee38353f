"""TraceLab round JSONL (``round_trace.jsonl``): one JSON object per agent round of a
recorded Claude Code / Codex session (TraceLab, SyFI Lab, University of Washington).

Fields read: ``session_id``, ``round_index``, ``input_tokens_total``, ``output_tokens``,
``timing_events[{event_type, timestamp}]`` and ``tools[{tool_wall_latency_ms}]``. Other
fields are ignored; in particular ``prefix_tokens`` / ``newly_append_tokens`` are what
the *provider's* prompt cache happened to hit (Claude cache breakpoints, Codex 128-token
granularity), not the structure of the context, so they are not used.

Mapping to native agents:

- one session is one agent (id = ``session_id``); its rounds are ordered by
  ``round_index`` (repeats are an error; gaps are allowed);
- prompts by prompt tracking on ``input_tokens_total`` (see
  :mod:`concur.sim.importers._common`): step 0's input is round 0's
  ``input_tokens_total``, step ``k``'s is ``input_tokens_total[k]`` minus the modelled
  context so far (earlier inputs and outputs), floored at 1. Recorded prompts
  sometimes grow by less than the previous output (reasoning tokens are not sent
  back), so the modelled prompt can run slightly ahead of the record;
- ``output_tokens`` is the step's output (0 becomes 1);
- timing: a round's *send time* is the latest of its input events (``user_message``,
  ``tool_result``): the request goes out once its last input is there. If a round has
  no input event, its earliest event is used. Its *response end* is the latest of its
  other events (``reasoning``, ``text``, ``tool_call``, ``usage_report``, ...), or the
  send time if there are none;
- the agent arrives at round 0's send time; the pause after round ``k`` is round
  ``k+1``'s send time minus round ``k``'s response end, floored at 0. After a round
  that called tools it equals the slowest tool's finish (``emitted_at +
  tool_wall_latency_ms``) minus the response end; after a final answer it is the
  user's think time before the next message;
- arrivals are rebased so the earliest session starts at 0 s. Sessions recorded on
  different days then arrive days apart (the shipped file: about 72 days); pass
  ``align_sessions=True`` to start every session at 0 s instead.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from concur.sim.importers._common import (
    Record,
    Request,
    build_steps,
    iter_json_objects,
    read_lines,
)
from concur.sim.trace import AgentTrace, Trace, TraceError

__all__ = ["INPUT_EVENTS", "load_tracelab_rounds", "parse_tracelab_rounds"]

INPUT_EVENTS: frozenset[str] = frozenset({"user_message", "tool_result"})


def _timestamp(event: Record) -> float:
    text = event.string("timestamp")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise event.error(
            "timestamp", f"must be an ISO 8601 time such as 2026-06-01T05:40:20.151Z, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise event.error("timestamp", f"must carry a time zone (e.g. a trailing Z), got {text!r}")
    return moment.timestamp()


def _round_times(record: Record) -> tuple[float, float]:
    """(send time, response end) of one round, in POSIX seconds."""
    inputs: list[float] = []
    outputs: list[float] = []
    for event in record.objects("timing_events"):
        kind = event.string("event_type")
        (inputs if kind in INPUT_EVENTS else outputs).append(_timestamp(event))
    if not inputs and not outputs:
        raise record.error("timing_events", "must have at least one event with a timestamp")
    sent = max(inputs) if inputs else min(outputs)
    finished = max(outputs) if outputs else sent
    return sent, max(sent, finished)


def parse_tracelab_rounds(lines: list[str], source: str, *, align_sessions: bool = False) -> Trace:
    """Parse TraceLab round JSONL lines into a :class:`Trace` (see the module docstring)."""
    sessions: dict[str, list[tuple[int, Record]]] = {}
    for record in iter_json_objects(lines, source):
        session_id = record.string("session_id")
        rounds = sessions.setdefault(session_id, [])
        index = record.integer("round_index")
        for other_index, other in rounds:
            if other_index == index:
                raise record.error(
                    "round_index",
                    f"round {index} of session {session_id!r} already appears on line {other.line}",
                )
        # Validate every field we use while the line number is at hand.
        record.integer("input_tokens_total", minimum=1)
        record.integer("output_tokens")
        _round_times(record)
        for tool in record.objects("tools") if record.has("tools") else []:
            if tool.has("tool_wall_latency_ms"):
                tool.number("tool_wall_latency_ms")
        rounds.append((index, record))
    if not sessions:
        raise TraceError(source, "no rounds found (every line is blank)")

    starts: dict[str, float] = {}
    steps: dict[str, list[Request]] = {}
    for session_id, rounds in sessions.items():
        ordered = [record for _, record in sorted(rounds, key=lambda pair: pair[0])]
        times = [_round_times(record) for record in ordered]
        starts[session_id] = times[0][0]
        requests: list[Request] = []
        for k, record in enumerate(ordered):
            gap = times[k + 1][0] - times[k][1] if k + 1 < len(ordered) else 0.0
            requests.append(
                Request(
                    prompt_tokens=record.integer("input_tokens_total", minimum=1),
                    output_tokens=record.integer("output_tokens"),
                    gap_after_s=max(0.0, gap),
                )
            )
        steps[session_id] = requests

    origin = min(starts.values())
    agents = tuple(
        AgentTrace(
            agent_id=session_id,
            arrival_s=0.0 if align_sessions else round(starts[session_id] - origin, 3),
            steps=build_steps(requests),
        )
        for session_id, requests in steps.items()
    )
    return Trace(agents=agents)


def load_tracelab_rounds(path: str | Path, *, align_sessions: bool = False) -> Trace:
    """Import a TraceLab ``round_trace.jsonl`` file (see the module docstring)."""
    return parse_tracelab_rounds(read_lines(path), str(path), align_sessions=align_sessions)
