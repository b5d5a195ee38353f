"""Alibaba Qwen-Bailian usage traces (alibaba-edu/qwen-bailian-usagetraces-anon, used
in "KVCache Cache in the Wild", ATC'25): JSONL, one request per line::

    {"chat_id": 159, "parent_chat_id": 55, "timestamp": 61.114, "input_length": 521,
     "output_length": 132, "type": "text", "turn": 2, "hash_ids": [1089, 1090, ...]}

``parent_chat_id`` is the previous turn's ``chat_id`` (-1 for a first turn);
``timestamp`` is seconds since the start of the trace; ``hash_ids`` has one salted
hash per 16-token block (``block_size``). No such file ships in ``../shared/traces``;
the tests use a small hand-written fixture in the same format
(``tests/fixtures/traces/bailian_sample.jsonl``).

Mapping to native agents:

- sessions follow ``parent_chat_id`` chains. A request continues its parent's session
  when it is the parent's earliest child (by timestamp, then line). A later child of
  the same parent (a regenerated or edited turn) starts a new agent, as does a request
  whose parent is not in the file (it fell outside the trace window); such an agent's
  first step carries its whole prompt. Duplicate ``chat_id`` and parent cycles are
  errors;
- the agent id is ``chat`` plus its first request's ``chat_id``; it arrives at that
  request's timestamp, rebased so the earliest request in the file is at 0 s;
- steps by prompt tracking on ``input_length`` (see
  :mod:`concur.sim.importers._common`); the published traces strip the ``<think>``
  tokens of an answer from the next turn's context, so prompts can grow by less than
  the previous output;
- shared prefix: the leading full blocks (``input_length // block_size``, at most
  ``len(hash_ids)``) of an agent's first request that another agent's first request
  also starts with (``id`` ``bl-prefix-<node>``). The count of ``hash_ids`` is not
  checked against ``input_length``: the last block may hold padding;
- tool latency after a step = the next turn's timestamp minus (this turn's timestamp +
  estimated service time), floored at 0, with the same estimate as the Mooncake
  importer (``uncached input / prefill_tokens_per_s + output * decode_s_per_token``).
  A child stamped before its parent therefore gets a pause of 0;
- ``type`` and ``turn`` are checked (a string and an integer >= 0) but not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from concur.sim.importers._common import (
    PrefixTrie,
    ServiceEstimate,
    iter_json_objects,
    read_lines,
    shared_prefix_depths,
    steps_from_arrivals,
)
from concur.sim.trace import AgentTrace, SharedPrefix, Trace, TraceError

__all__ = [
    "BailianRequest",
    "bailian_sessions",
    "load_bailian",
    "parse_bailian",
    "parse_bailian_requests",
]

DEFAULT_BLOCK_SIZE = 16
ROOT_PARENT = "-1"


@dataclass(frozen=True, slots=True)
class BailianRequest:
    """One request of a Bailian trace, with the line it came from."""

    line: int
    chat_id: str
    parent_chat_id: str
    timestamp_s: float
    input_length: int
    output_length: int
    type: str
    turn: int
    hash_ids: tuple[int, ...]

    def full_blocks(self, block_size: int) -> tuple[int, ...]:
        """The hash ids of the prompt's full blocks."""
        return self.hash_ids[: self.input_length // block_size]


def parse_bailian_requests(lines: Sequence[str], source: str) -> list[BailianRequest]:
    """Parse and check every line; return the requests in ``(timestamp, line)`` order."""
    requests: list[BailianRequest] = []
    lines_by_id: dict[str, int] = {}
    for record in iter_json_objects(lines, source):
        chat_id = record.string("chat_id")
        if chat_id in lines_by_id:
            raise record.error(
                "chat_id", f"duplicate chat_id {chat_id} (first on line {lines_by_id[chat_id]})"
            )
        lines_by_id[chat_id] = record.line
        parent = record.string("parent_chat_id")
        if parent == chat_id:
            raise record.error("parent_chat_id", f"a chat cannot be its own parent ({chat_id})")
        requests.append(
            BailianRequest(
                line=record.line,
                chat_id=chat_id,
                parent_chat_id=parent,
                timestamp_s=record.number("timestamp"),
                input_length=record.integer("input_length", minimum=1),
                output_length=record.integer("output_length"),
                type=record.string("type"),
                turn=record.integer("turn"),
                hash_ids=tuple(record.int_list("hash_ids")),
            )
        )
    if not requests:
        raise TraceError(source, "no requests found (every line is blank)")
    requests.sort(key=lambda r: (r.timestamp_s, r.line))
    return requests


def bailian_sessions(requests: Sequence[BailianRequest], source: str) -> list[list[int]]:
    """Follow ``parent_chat_id`` chains; see the module docstring.

    ``requests`` must be in ``(timestamp, line)`` order. Returns lists of indices into
    ``requests``, each session in chain order, the sessions ordered by first request.
    """
    index_of = {request.chat_id: i for i, request in enumerate(requests)}
    children: dict[int, list[int]] = {}
    starts: list[int] = []
    for i, request in enumerate(requests):
        parent = index_of.get(request.parent_chat_id)
        if request.parent_chat_id == ROOT_PARENT or parent is None:
            starts.append(i)
        else:
            children.setdefault(parent, []).append(i)  # already in time order
    sessions: list[list[int]] = []
    pending = list(starts)
    visited: set[int] = set()
    while pending:
        current = pending.pop()
        chain = [current]
        visited.add(current)
        while children.get(current):
            first, *forks = children[current]
            pending.extend(forks)
            chain.append(first)
            visited.add(first)
            current = first
        sessions.append(chain)
    if len(visited) != len(requests):
        stuck = min(
            (requests[i] for i in range(len(requests)) if i not in visited), key=lambda r: r.line
        )
        raise TraceError(
            source,
            f"chat {stuck.chat_id} is part of a parent_chat_id cycle",
            line=stuck.line,
            field="parent_chat_id",
        )
    sessions.sort(key=lambda chain: chain[0])
    return sessions


def parse_bailian(
    lines: Sequence[str],
    source: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    prefill_tokens_per_s: float = 5000.0,
    decode_s_per_token: float = 0.03,
) -> Trace:
    """Parse Bailian JSONL lines into a :class:`Trace` (see the module docstring)."""
    if block_size < 1:
        raise TraceError(source, f"block_size must be >= 1, got {block_size}")
    estimate = ServiceEstimate(prefill_tokens_per_s, decode_s_per_token)
    requests = parse_bailian_requests(lines, source)
    sessions = bailian_sessions(requests, source)
    origin = requests[0].timestamp_s
    trie = PrefixTrie()
    paths = [trie.insert(requests[s[0]].full_blocks(block_size)) for s in sessions]
    depths = shared_prefix_depths(paths)
    agents: list[AgentTrace] = []
    for session, path, depth in zip(sessions, paths, depths, strict=True):
        members = [requests[i] for i in session]
        prefix = (
            SharedPrefix(id=f"bl-prefix-{path[depth - 1]}", tokens=depth * block_size)
            if depth > 0
            else None
        )
        turns = [(r.timestamp_s, r.input_length, r.output_length) for r in members]
        cached = prefix.tokens if prefix is not None else 0
        agents.append(
            AgentTrace(
                agent_id=f"chat{members[0].chat_id}",
                arrival_s=round(members[0].timestamp_s - origin, 3),
                shared_prefix=prefix,
                steps=steps_from_arrivals(turns, estimate, cached),
            )
        )
    return Trace(agents=tuple(agents))


def load_bailian(
    path: str | Path,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    prefill_tokens_per_s: float = 5000.0,
    decode_s_per_token: float = 0.03,
) -> Trace:
    """Import a Qwen-Bailian JSONL trace file (see the module docstring)."""
    return parse_bailian(
        read_lines(path),
        str(path),
        block_size=block_size,
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_s_per_token=decode_s_per_token,
    )
