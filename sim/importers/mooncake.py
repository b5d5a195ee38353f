"""Mooncake JSONL traces (kvcache-ai/Mooncake, FAST'25 release): one request per line,
``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`` with one
hash id per ``block_size`` (512) tokens of the prompt; equal ids mean an equal prefix
block. There is no session id, so sessions are *inferred* from prefix extension.

Session inference (:func:`infer_sessions`), over requests in ``(timestamp, line)``
order. Only *full* blocks count (``input_length // block_size`` of them): the last,
partial block's id changes once more tokens are appended. All full-block sequences go
into one prefix trie, so a trie node is one distinct prefix. Request ``i`` continues
the session whose latest request ``j`` satisfies all of:

1. ``i``'s full blocks start with all of ``j``'s full blocks (``j`` has at least one);
2. ``j`` arrived strictly earlier than ``i``;
3. ``i`` grew by about ``j``'s answer: ``input_i > input_j`` and
   ``input_i >= input_j + (1 - output_slack) * output_j`` (default slack 0.5; on the
   conversation file the growth beyond ``input_j + output_j`` has a median of +26
   tokens, but a few percent of turns drop some of the answer). Requests that only
   share a document or template prefix with ``j`` and have about its length fail this;
4. ``j``'s last full block is not a *shared* prefix: following single-child links down
   from that trie node, the first split has fewer than ``shared_min_branches``
   (default 8) distinct next blocks. A system prompt is extended thousands of ways
   (6,047 on the conversation file) while a conversation's own blocks split at most a
   few ways (forks, up to 7 there), so a request that matches ``j`` only on a system
   prompt is *not* taken as ``j``'s next turn.

If several sessions qualify, the deepest match wins, then the ``j`` whose
``input_j + output_j`` is closest to ``input_i``, then the latest ``j``. A session is
a chain: once ``j`` is continued, another request extending ``j`` (a fork, a
regeneration) starts a new session. Anything that continues nothing starts a session.

On the public files (``../shared/traces``): ``conversation_trace.jsonl``, 12,031
requests, gives 8,216 sessions (2,005 of them multi-turn, the longest 43 turns);
``synthetic_trace.jsonl``, 3,993 requests, gives 3,579 (354 multi-request, at most 5).

Conversion to native agents (:func:`sessions_to_trace`):

- the agent arrives at its first request's timestamp, rebased so the earliest request
  in the file is at 0 s; its id is ``mc`` plus the first request's line number;
- steps by prompt tracking on ``input_length`` (see :mod:`concur.sim.importers._common`);
- the shared prefix of an agent is the leading full blocks of its first request that at
  least one other agent's first request also starts with (``id`` ``mc-prefix-<node>``,
  ``tokens`` = blocks x ``block_size``). The native format has one prefix per agent, so
  only the longest shared one is kept;
- tool latency after step ``k`` = next request's arrival minus (this request's arrival
  + estimated service time), floored at 0. The estimate is
  ``uncached input / prefill_tokens_per_s + output * decode_s_per_token`` (defaults
  5,000 tokens/s and 0.03 s/token; the uncached input is the step's new input, minus
  the shared prefix on step 0). The record holds only arrivals, so the gap absorbs any
  error of that estimate (and any queueing the original run saw).
"""

from __future__ import annotations

import math
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
    "MooncakeRequest",
    "infer_sessions",
    "load_mooncake",
    "parse_mooncake",
    "parse_mooncake_requests",
    "sessions_to_trace",
]

DEFAULT_BLOCK_SIZE = 512


@dataclass(frozen=True, slots=True)
class MooncakeRequest:
    """One request of a Mooncake trace, with the line it came from."""

    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def full_blocks(self, block_size: int) -> tuple[int, ...]:
        """The hash ids of the prompt's full blocks."""
        return self.hash_ids[: self.input_length // block_size]


def parse_mooncake_requests(
    lines: Sequence[str], source: str, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[MooncakeRequest]:
    """Parse and check every line; return the requests in ``(timestamp, line)`` order.

    ``hash_ids`` must hold exactly ``ceil(input_length / block_size)`` ids.
    """
    if block_size < 1:
        raise TraceError(source, f"block_size must be >= 1, got {block_size}")
    requests: list[MooncakeRequest] = []
    for record in iter_json_objects(lines, source):
        length = record.integer("input_length", minimum=1)
        hash_ids = record.int_list("hash_ids")
        expected = math.ceil(length / block_size)
        if len(hash_ids) != expected:
            raise record.error(
                "hash_ids",
                f"must hold ceil(input_length / {block_size}) = {expected} block ids for "
                f"input_length {length}, got {len(hash_ids)} (is the block size right?)",
            )
        requests.append(
            MooncakeRequest(
                line=record.line,
                timestamp_ms=record.number("timestamp"),
                input_length=length,
                output_length=record.integer("output_length"),
                hash_ids=tuple(hash_ids),
            )
        )
    if not requests:
        raise TraceError(source, "no requests found (every line is blank)")
    requests.sort(key=lambda r: (r.timestamp_ms, r.line))
    return requests


def _check_rules(output_slack: float, shared_min_branches: int) -> None:
    if not 0.0 <= output_slack <= 1.0:
        raise ValueError(f"output_slack must be within [0, 1], got {output_slack}")
    if shared_min_branches < 2:
        raise ValueError(f"shared_min_branches must be >= 2, got {shared_min_branches}")


def infer_sessions(
    requests: Sequence[MooncakeRequest],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    output_slack: float = 0.5,
    shared_min_branches: int = 8,
) -> list[list[int]]:
    """Group requests (in time order) into sessions; see the module docstring.

    Returns lists of indices into ``requests``, each in time order, the sessions
    ordered by their first request.
    """
    _check_rules(output_slack, shared_min_branches)
    trie = PrefixTrie()
    paths = [trie.insert(request.full_blocks(block_size)) for request in requests]
    tails: dict[int, list[int]] = {}
    sessions: list[list[int]] = []
    for index, request in enumerate(requests):
        best: tuple[tuple[int, float, int], int, int] | None = None
        for depth, node in enumerate(paths[index], start=1):
            for session in tails.get(node, ()):
                last = sessions[session][-1]
                previous = requests[last]
                if previous.timestamp_ms >= request.timestamp_ms:
                    continue
                needed = previous.input_length + (1.0 - output_slack) * previous.output_length
                if request.input_length <= previous.input_length or request.input_length < needed:
                    continue
                residual = request.input_length - previous.input_length - previous.output_length
                key = (depth, -abs(residual), last)
                if best is None or key > best[0]:
                    best = (key, session, node)
        if best is None:
            session = len(sessions)
            sessions.append([index])
        else:
            _, session, node = best
            tails[node].remove(session)
            sessions[session].append(index)
        # A session whose latest request ends on a shared prefix can never be continued.
        if paths[index] and trie.chain_fanout(paths[index][-1]) < shared_min_branches:
            tails.setdefault(paths[index][-1], []).append(session)
    return sessions


def _shared_prefixes(
    requests: Sequence[MooncakeRequest], sessions: Sequence[Sequence[int]], block_size: int
) -> list[SharedPrefix | None]:
    trie = PrefixTrie()
    paths = [trie.insert(requests[session[0]].full_blocks(block_size)) for session in sessions]
    prefixes: list[SharedPrefix | None] = []
    for path, depth in zip(paths, shared_prefix_depths(paths), strict=True):
        prefixes.append(
            SharedPrefix(id=f"mc-prefix-{path[depth - 1]}", tokens=depth * block_size)
            if depth > 0
            else None
        )
    return prefixes


def sessions_to_trace(
    requests: Sequence[MooncakeRequest],
    sessions: Sequence[Sequence[int]],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    prefill_tokens_per_s: float = 5000.0,
    decode_s_per_token: float = 0.03,
) -> Trace:
    """Native agents for inferred sessions; see the module docstring."""
    estimate = ServiceEstimate(prefill_tokens_per_s, decode_s_per_token)
    origin = min(request.timestamp_ms for request in requests)
    width = len(str(max(request.line for request in requests)))
    agents: list[AgentTrace] = []
    prefixes = _shared_prefixes(requests, sessions, block_size)
    for session, prefix in zip(sessions, prefixes, strict=True):
        members = [requests[index] for index in session]
        turns = [(r.timestamp_ms / 1000.0, r.input_length, r.output_length) for r in members]
        cached = prefix.tokens if prefix is not None else 0
        first = members[0]
        agents.append(
            AgentTrace(
                agent_id=f"mc{first.line:0{width}d}",
                arrival_s=round((first.timestamp_ms - origin) / 1000.0, 3),
                shared_prefix=prefix,
                steps=steps_from_arrivals(turns, estimate, cached),
            )
        )
    return Trace(agents=tuple(agents))


def parse_mooncake(
    lines: Sequence[str],
    source: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    output_slack: float = 0.5,
    shared_min_branches: int = 8,
    prefill_tokens_per_s: float = 5000.0,
    decode_s_per_token: float = 0.03,
) -> Trace:
    """Parse Mooncake JSONL lines, infer sessions and build a :class:`Trace`."""
    _check_rules(output_slack, shared_min_branches)  # option errors before data errors
    ServiceEstimate(prefill_tokens_per_s, decode_s_per_token)
    requests = parse_mooncake_requests(lines, source, block_size=block_size)
    sessions = infer_sessions(
        requests,
        block_size=block_size,
        output_slack=output_slack,
        shared_min_branches=shared_min_branches,
    )
    return sessions_to_trace(
        requests,
        sessions,
        block_size=block_size,
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_s_per_token=decode_s_per_token,
    )


def load_mooncake(
    path: str | Path,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    output_slack: float = 0.5,
    shared_min_branches: int = 8,
    prefill_tokens_per_s: float = 5000.0,
    decode_s_per_token: float = 0.03,
) -> Trace:
    """Import a Mooncake JSONL trace file (see the module docstring)."""
    return parse_mooncake(
        read_lines(path),
        str(path),
        block_size=block_size,
        output_slack=output_slack,
        shared_min_branches=shared_min_branches,
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_s_per_token=decode_s_per_token,
    )
