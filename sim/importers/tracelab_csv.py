"""TraceLab replay CSV: ``session_id,arrival_time,round_idx,prefix_len,input_len,
output_len,tool_wait_after_ms`` (TraceLab, SyFI Lab, University of Washington).

Mapping to native agents:

- one session (``session_id``) is one agent, its id the session id as written;
- rows are grouped by session and ordered by ``round_idx``, which must run 0, 1, 2, ...
  without gaps or repeats (rows may appear in any order in the file);
- ``arrival_time`` (ms) is a session's arrival: the agent arrives at its round-0
  ``arrival_time``, rebased so the earliest session arrives at 0 s (later rows of a
  session repeat the same value in the shipped file; they are not used);
- a round's prompt is ``prefix_len + input_len``: ``prefix_len`` is the context the
  round reuses, ``input_len`` its new tokens. In the shipped file ``prefix_len`` of
  round ``k`` always equals round ``k-1``'s ``prefix_len + input_len + output_len``
  (and 0 for round 0), i.e. the whole previous context, so each step's
  ``input_tokens`` is exactly ``input_len``. Files where that does not hold are
  imported by prompt tracking (see :mod:`concur.sim.importers._common`);
- ``output_len`` is the step's output (0 becomes 1);
- ``tool_wait_after_ms`` is the pause after the round, in seconds in the native trace
  (the last round's value is ignored; it is 0 in the shipped file).
"""

from __future__ import annotations

import csv
from pathlib import Path

from concur.sim.importers._common import Record, Request, build_steps, read_lines
from concur.sim.trace import AgentTrace, Trace, TraceError

__all__ = ["COLUMNS", "load_tracelab_csv", "parse_tracelab_csv"]

COLUMNS: tuple[str, ...] = (
    "session_id",
    "arrival_time",
    "round_idx",
    "prefix_len",
    "input_len",
    "output_len",
    "tool_wait_after_ms",
)


def parse_tracelab_csv(lines: list[str], source: str) -> Trace:
    """Parse the lines of a TraceLab CSV (header first) into a :class:`Trace`."""
    reader = csv.reader(lines)
    header: list[str] | None = None
    rows: dict[str, list[Record]] = {}
    for cells in reader:
        number = reader.line_num
        if not cells or all(not cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            missing = [column for column in COLUMNS if column not in header]
            if missing:
                raise TraceError(
                    source,
                    f"header is missing column(s) {', '.join(missing)}; "
                    f"expected {','.join(COLUMNS)}",
                    line=number,
                )
            continue
        if len(cells) != len(header):
            raise TraceError(
                source,
                f"expected {len(header)} comma-separated values, got {len(cells)}",
                line=number,
            )
        record = Record(source, number, dict(zip(header, cells, strict=True)))
        rows.setdefault(record.string("session_id").strip(), []).append(record)
    if header is None:
        raise TraceError(source, "file is empty: expected a header line " + ",".join(COLUMNS))
    if not rows:
        raise TraceError(source, "no rounds after the header")

    first_ms: dict[str, float] = {}
    sessions: dict[str, list[Request]] = {}
    for session_id, records in rows.items():
        ordered = sorted(records, key=lambda r: (r.integer("round_idx"), r.line))
        requests: list[Request] = []
        for expected, record in enumerate(ordered):
            index = record.integer("round_idx")
            if index != expected:
                other = ordered[expected - 1].line if index < expected else None
                detail = (
                    f"round {index} of session {session_id!r} repeats line {other}"
                    if other is not None
                    else f"session {session_id!r} has no round {expected} before round {index}"
                )
                raise record.error("round_idx", detail + "; rounds must run 0, 1, 2, ...")
            prefix = record.integer("prefix_len")
            new = record.integer("input_len")
            if prefix + new < 1:
                raise record.error("input_len", "prefix_len + input_len must be >= 1, got 0")
            arrival = record.number("arrival_time")
            if expected == 0:
                first_ms[session_id] = arrival
            requests.append(
                Request(
                    prompt_tokens=prefix + new,
                    output_tokens=record.integer("output_len"),
                    gap_after_s=record.number("tool_wait_after_ms") / 1000.0,
                )
            )
        sessions[session_id] = requests

    start_ms = min(first_ms.values())
    agents = tuple(
        AgentTrace(
            agent_id=session_id,
            arrival_s=round((first_ms[session_id] - start_ms) / 1000.0, 6),
            steps=build_steps(requests),
        )
        for session_id, requests in sessions.items()
    )
    return Trace(agents=agents)


def load_tracelab_csv(path: str | Path) -> Trace:
    """Import a TraceLab replay CSV file (see the module docstring for the mapping)."""
    return parse_tracelab_csv(read_lines(path), str(path))
