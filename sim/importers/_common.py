"""Helpers shared by the importers: line-numbered field checks, step building, prefix tries.

Every importer reduces its format to *sessions*: ordered lists of requests, each with
the whole prompt length it sent, the tokens it decoded and the pause before the next
request. :func:`build_steps` turns one session into native steps by *prompt tracking*:
step ``k``'s new input is whatever makes the modelled prompt (context so far + new
input) equal the recorded prompt, floored at 1 token. When a recorded prompt is shorter
than the modelled context (the client dropped tokens, e.g. reasoning or special tokens),
the native format cannot shrink a context, so the step adds 1 token and the model runs
ahead of the record by at most that shortfall until a later prompt catches up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concur.sim.trace import Step, TraceError, json_object_line

__all__ = [
    "PrefixTrie",
    "Record",
    "Request",
    "ServiceEstimate",
    "build_steps",
    "iter_json_objects",
    "read_lines",
    "shared_prefix_depths",
    "steps_from_arrivals",
]


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file; unreadable or non-UTF-8 files raise :class:`TraceError`."""
    source = str(path)
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(source, f"cannot read trace file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(source, f"not UTF-8 text: {exc.reason}") from None


class Record:
    """One parsed input row with typed, line-numbered field accessors.

    Every accessor raises :class:`TraceError` naming the source, the line, the field
    and what is allowed.
    """

    __slots__ = ("line", "source", "values")

    def __init__(self, source: str, line: int, values: dict[str, Any]) -> None:
        self.source = source
        self.line = line
        self.values = values

    def error(self, field: str | None, message: str) -> TraceError:
        """A :class:`TraceError` located at this row."""
        return TraceError(self.source, message, line=self.line, field=field)

    def _get(self, name: str) -> Any:
        if name not in self.values or self.values[name] is None:
            raise self.error(name, "required field is missing")
        return self.values[name]

    def has(self, name: str) -> bool:
        """Whether ``name`` is present and not null."""
        return self.values.get(name) is not None

    def integer(self, name: str, *, minimum: int = 0) -> int:
        """An integer field (a JSON int, or a CSV cell of digits) ``>= minimum``."""
        value = self._get(name)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text)
            except ValueError:
                raise self.error(name, f"must be an integer >= {minimum}, got {text!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def number(self, name: str, *, minimum: float = 0.0) -> float:
        """A finite number field ``>= minimum``."""
        value = self._get(name)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = float(text)
            except ValueError:
                raise self.error(name, f"must be a number >= {minimum:g}, got {text!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number >= {minimum:g}, got {value!r}")
        if not math.isfinite(value):
            raise self.error(name, f"must be a finite number, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum:g}, got {value!r}")
        return float(value)

    def string(self, name: str) -> str:
        """A non-empty string field (JSON numbers are accepted and stringified)."""
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(name, f"must be a non-empty string, got {value!r}")
        text = str(value)
        if not text:
            raise self.error(name, "must be a non-empty string, got ''")
        return text

    def int_list(self, name: str) -> list[int]:
        """A list of integers (e.g. block hash ids)."""
        value = self._get(name)
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of integers, got {value!r}")
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.error(f"{name}.{index}", f"must be an integer, got {item!r}")
        return value

    def objects(self, name: str) -> list[Record]:
        """A list of JSON objects, each as a :class:`Record` on the same line."""
        value = self._get(name)
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of objects, got {value!r}")
        records: list[Record] = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{name}.{index}", f"must be an object, got {item!r}")
            prefixed = _Prefixed(self.source, self.line, item, f"{name}.{index}.")
            records.append(prefixed)
        return records


class _Prefixed(Record):
    """A nested object: field names in errors carry the path of the parent list."""

    __slots__ = ("prefix",)

    def __init__(self, source: str, line: int, values: dict[str, Any], prefix: str) -> None:
        super().__init__(source, line, values)
        self.prefix = prefix

    def error(self, field: str | None, message: str) -> TraceError:
        return super().error(None if field is None else self.prefix + field, message)


def iter_json_objects(lines: Iterable[str], source: str) -> Iterator[Record]:
    """Yield one :class:`Record` per non-blank JSONL line (1-based line numbers)."""
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        yield Record(source, number, json_object_line(source, number, text))


@dataclass(frozen=True, slots=True)
class Request:
    """One recorded request of a session, before conversion to a native step.

    ``prompt_tokens`` is the whole prompt the request sent; ``gap_after_s`` the pause
    between its response and the session's next request.
    """

    prompt_tokens: int
    output_tokens: int
    gap_after_s: float = 0.0


def build_steps(requests: Sequence[Request]) -> tuple[Step, ...]:
    """Native steps for one session by prompt tracking (see the module docstring).

    Outputs below 1 token become 1 (an engine always decodes at least one token); gaps
    are rounded to milliseconds; the last step's gap is dropped.
    """
    steps: list[Step] = []
    context = 0
    last = len(requests) - 1
    for index, request in enumerate(requests):
        new = max(1, request.prompt_tokens - context)
        out = max(1, request.output_tokens)
        gap = round(max(0.0, request.gap_after_s), 3) if index < last else 0.0
        steps.append(Step(input_tokens=new, output_tokens=out, tool_latency_s=gap))
        context += new + out
    return tuple(steps)


class PrefixTrie:
    """A trie of block-hash sequences; each node is one distinct prefix of full blocks.

    Node 0 is the empty prefix. Node ids are assigned in insertion order, so they are
    deterministic for a deterministic input order. Works whether or not the hash ids of
    a format are prefix-chained, because a node is identified by its whole path.
    """

    __slots__ = ("_chain_fanout", "_children")

    def __init__(self) -> None:
        self._children: list[dict[int, int]] = [{}]
        self._chain_fanout: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._children)

    def insert(self, blocks: Iterable[int]) -> list[int]:
        """Insert a block sequence; return the node id after each block."""
        path: list[int] = []
        node = 0
        for block in blocks:
            children = self._children[node]
            child = children.get(block)
            if child is None:
                child = len(self._children)
                children[block] = child
                self._children.append({})
            path.append(child)
            node = child
        return path

    def fanout(self, node: int) -> int:
        """Number of distinct blocks that follow this prefix."""
        return len(self._children[node])

    def chain_fanout(self, node: int) -> int:
        """The fanout of the first node at or below ``node`` that does not have exactly
        one child (following the single-child chain down). A prefix that every request
        extends the same way for a while and then splits ``n`` ways reports ``n``; a
        prefix that never splits reports 0.
        """
        cached = self._chain_fanout.get(node)
        if cached is not None:
            return cached
        chain: list[int] = []
        current = node
        while current not in self._chain_fanout and len(self._children[current]) == 1:
            chain.append(current)
            current = next(iter(self._children[current].values()))
        result = self._chain_fanout.get(current, len(self._children[current]))
        self._chain_fanout[current] = result
        for visited in chain:
            self._chain_fanout[visited] = result
        return result


def shared_prefix_depths(paths: Sequence[Sequence[int]]) -> list[int]:
    """For each path (trie nodes of one agent's first request), how many leading blocks
    it shares with at least one *other* path.
    """
    counts: dict[int, int] = {}
    for path in paths:
        for node in path:
            counts[node] = counts.get(node, 0) + 1
    depths: list[int] = []
    for path in paths:
        depth = 0
        for node in path:
            if counts[node] < 2:
                break
            depth += 1
        depths.append(depth)
    return depths


@dataclass(frozen=True, slots=True)
class ServiceEstimate:
    """A crude service-time model for traces that record only arrivals.

    ``seconds`` = uncached input / ``prefill_tokens_per_s`` + output x
    ``decode_s_per_token``. The pause before a session's next request is then its
    arrival minus (this arrival + this estimate), floored at 0.
    """

    prefill_tokens_per_s: float = 5000.0
    decode_s_per_token: float = 0.03

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prefill_tokens_per_s) and self.prefill_tokens_per_s > 0):
            raise ValueError(
                f"prefill_tokens_per_s must be a finite number > 0, "
                f"got {self.prefill_tokens_per_s!r}"
            )
        if not (math.isfinite(self.decode_s_per_token) and self.decode_s_per_token >= 0):
            raise ValueError(
                f"decode_s_per_token must be a finite number >= 0, got {self.decode_s_per_token!r}"
            )

    def seconds(self, step: Step, cached_tokens: int = 0) -> float:
        """Estimated time to serve ``step`` when ``cached_tokens`` of its input are cached."""
        uncached = max(0, step.input_tokens - cached_tokens)
        return uncached / self.prefill_tokens_per_s + step.output_tokens * self.decode_s_per_token


def steps_from_arrivals(
    turns: Sequence[tuple[float, int, int]], estimate: ServiceEstimate, cached_first: int = 0
) -> tuple[Step, ...]:
    """Native steps for one session given ``(arrival_s, prompt_tokens, output_tokens)``
    per request, in order: prompt tracking for the inputs, and the pause after each
    step = next arrival - (arrival + estimated service time), floored at 0.
    ``cached_first`` tokens of step 0 (a shared prefix) count as cached.
    """
    plain = build_steps([Request(prompt, output) for _, prompt, output in turns])
    timed: list[Request] = []
    for k, (arrival, prompt, output) in enumerate(turns):
        gap = 0.0
        if k + 1 < len(turns):
            service = estimate.seconds(plain[k], cached_first if k == 0 else 0)
            gap = turns[k + 1][0] - arrival - service
        timed.append(Request(prompt, output, gap))
    return build_steps(timed)
