"""concur's native agent-trace format: JSONL, one agent per line.

Each line is one agent::

    {"agent_id": "a1", "arrival_s": 0.0,
     "shared_prefix": {"id": "sys", "tokens": 2048},
     "steps": [{"input_tokens": 4000, "output_tokens": 300, "tool_latency_s": 2.5}, ...]}

Semantics:

- Step ``k``'s prompt is the agent's whole context so far (every earlier step's input
  and output) plus step ``k``'s new ``input_tokens``; the step then decodes
  ``output_tokens``.
- ``shared_prefix`` (optional) says that the first ``tokens`` tokens of step 0's input
  are identical across every agent with the same prefix ``id`` (a shared system
  prompt). So ``tokens`` must not exceed ``steps[0].input_tokens``, and one id must
  always carry the same token count.
- ``tool_latency_s`` is the pause after the step's response before the next step is
  sent (a tool call, or a user's think time). The last step's value is ignored; it
  defaults to 0.

A :class:`Trace` keeps its agents sorted by ``(arrival_s, agent_id)`` so that every
consumer sees them in one deterministic order. :func:`load_trace` and
:func:`parse_trace` turn every problem into a :class:`TraceError` that names the file,
the line, the field and what is allowed, e.g.
``trace.jsonl line 7: steps.2.output_tokens: must be >= 1, got 0``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "AgentTrace",
    "SharedPrefix",
    "Step",
    "Trace",
    "TraceError",
    "TraceSummary",
    "dump_trace",
    "load_trace",
    "parse_trace",
    "summarize",
    "to_jsonl",
]

StrictPositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeSeconds = Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]


class TraceError(ValueError):
    """A trace (native or imported) could not be read.

    The message is complete and meant for the user; ``source``, ``line`` (1-based,
    or ``None`` for whole-file problems) and ``field`` (dotted path, or ``None``) are
    kept for programs and tests.
    """

    def __init__(
        self, source: str, message: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        where = source if line is None else f"{source} line {line}"
        what = message if field is None else f"{field}: {message}"
        super().__init__(f"{where}: {what}")
        self.source = source
        self.line = line
        self.field = field
        self.detail = message


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SharedPrefix(_Frozen):
    """The leading tokens of step 0's input that agents with the same ``id`` share."""

    id: NonEmptyStr
    tokens: StrictPositiveInt


class Step(_Frozen):
    """One request of an agent: new input, decoded output, then a tool pause."""

    input_tokens: StrictPositiveInt
    output_tokens: StrictPositiveInt
    tool_latency_s: NonNegativeSeconds = 0.0


class AgentTrace(_Frozen):
    """One agent: when it arrives, what it shares, and its steps in order."""

    agent_id: NonEmptyStr
    arrival_s: NonNegativeSeconds
    shared_prefix: SharedPrefix | None = None
    steps: Annotated[tuple[Step, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _prefix_fits_first_input(self) -> AgentTrace:
        if self.shared_prefix is not None:
            first = self.steps[0].input_tokens
            if self.shared_prefix.tokens > first:
                raise PydanticCustomError(
                    "shared_prefix_too_long",
                    "must be <= steps.0.input_tokens ({first}), got {tokens}",
                    {"first": first, "tokens": self.shared_prefix.tokens},
                )
        return self

    @property
    def total_input_tokens(self) -> int:
        """Sum of every step's new input tokens."""
        return sum(step.input_tokens for step in self.steps)

    @property
    def total_output_tokens(self) -> int:
        """Sum of every step's output tokens."""
        return sum(step.output_tokens for step in self.steps)

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens: also the context length after the last step."""
        return self.total_input_tokens + self.total_output_tokens

    @property
    def prompt_tokens(self) -> tuple[int, ...]:
        """The prompt length each step sends (whole context so far plus new input)."""
        prompts: list[int] = []
        context = 0
        for step in self.steps:
            context += step.input_tokens
            prompts.append(context)
            context += step.output_tokens
        return tuple(prompts)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the agent sends (its last step's)."""
        return self.prompt_tokens[-1]

    @property
    def max_context_tokens(self) -> int:
        """The largest context the agent holds: its last prompt plus its last output."""
        return self.total_tokens

    @property
    def total_tool_latency_s(self) -> float:
        """Sum of the pauses between steps (the last step's value is ignored)."""
        return sum(step.tool_latency_s for step in self.steps[:-1])


class Trace(_Frozen):
    """A whole workload: agents sorted by ``(arrival_s, agent_id)``.

    Agent ids are unique, and a shared prefix id always carries the same token count.
    """

    agents: Annotated[tuple[AgentTrace, ...], Field(min_length=1)]

    @field_validator("agents", mode="after")
    @classmethod
    def _sorted_and_consistent(cls, agents: tuple[AgentTrace, ...]) -> tuple[AgentTrace, ...]:
        seen: set[str] = set()
        prefix_tokens: dict[str, int] = {}
        for agent in agents:
            if agent.agent_id in seen:
                raise PydanticCustomError(
                    "duplicate_agent_id", "duplicate agent_id {id!r}", {"id": agent.agent_id}
                )
            seen.add(agent.agent_id)
            prefix = agent.shared_prefix
            if prefix is not None:
                known = prefix_tokens.setdefault(prefix.id, prefix.tokens)
                if known != prefix.tokens:
                    raise PydanticCustomError(
                        "shared_prefix_mismatch",
                        "shared prefix {id!r} has {known} tokens on one agent and {tokens} "
                        "on agent {agent!r}",
                        {
                            "id": prefix.id,
                            "known": known,
                            "tokens": prefix.tokens,
                            "agent": agent.agent_id,
                        },
                    )
        return tuple(sorted(agents, key=lambda a: (a.arrival_s, a.agent_id)))

    @property
    def total_steps(self) -> int:
        """Number of requests in the whole trace."""
        return sum(len(agent.steps) for agent in self.agents)


# --------------------------------------------------------------------------- errors


def _field_path(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _allowed_fields(loc: Sequence[int | str]) -> tuple[str, ...]:
    """The field names allowed in the object that holds the field at ``loc``."""
    parent = tuple(loc[:-1])
    if not parent:
        model: type[BaseModel] = AgentTrace
    elif parent[0] == "shared_prefix":
        model = SharedPrefix
    elif parent[0] == "steps":
        model = Step
    else:
        return ()
    return tuple(model.model_fields)


def _describe_error(error: Any) -> str:
    """Turn one pydantic error dict into 'what is allowed, got what'."""
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    got = error.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_fields(error["loc"]))
        return f"unknown field (allowed: {allowed})"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}, got {got!r}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}, got {got!r}"
    if kind == "int_type":
        return f"must be an integer, got {got!r}"
    if kind == "float_type":
        return f"must be a number, got {got!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {got!r}"
    if kind in ("string_type", "string_too_short"):
        return f"must be a non-empty string, got {got!r}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, got {got!r}"
    if kind == "too_short":
        return (
            f"must have at least {ctx.get('min_length', 1)} item(s), "
            f"got {ctx.get('actual_length', 0)}"
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be an object, got {got!r}"
    return f"{error['msg']}, got {got!r}"


def _validation_error(source: str, line: int | None, exc: ValidationError) -> TraceError:
    """Build a :class:`TraceError` from the first error of a pydantic failure."""
    errors = exc.errors(include_url=False)
    error = errors[0]
    loc = tuple(error["loc"])
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if error["type"] == "shared_prefix_too_long":
        return TraceError(source, error["msg"] + more, line=line, field="shared_prefix.tokens")
    if not loc:
        return TraceError(source, error["msg"] + more, line=line)
    return TraceError(source, _describe_error(error) + more, line=line, field=_field_path(loc))


# --------------------------------------------------------------------------- reading


def json_object_line(source: str, number: int, text: str, what: str = "") -> dict[str, Any]:
    """Line ``number`` of a JSONL file parsed as one JSON object (``what`` says what
    it stands for, in the error), or a :class:`TraceError` naming the line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(
            source, f"invalid JSON: {exc.msg} (column {exc.colno})", line=number
        ) from None
    if not isinstance(obj, dict):
        kind = f"a JSON object ({what})" if what else "a JSON object"
        raise TraceError(source, f"must be {kind}, got {type(obj).__name__}", line=number)
    return obj


def _parse_agent(source: str, number: int, text: str) -> AgentTrace:
    obj = json_object_line(source, number, text, "one agent")
    try:
        return AgentTrace.model_validate(obj)
    except ValidationError as exc:
        raise _validation_error(source, number, exc) from None


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> Trace:
    """Parse native JSONL lines (blank lines ignored) into a :class:`Trace`.

    ``source`` names the input in error messages (usually the file name). Raises
    :class:`TraceError` on the first problem, naming its 1-based line number.
    """
    agents: list[AgentTrace] = []
    first_line: dict[str, int] = {}
    prefix_seen: dict[str, tuple[int, int]] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        agent = _parse_agent(source, number, text)
        if agent.agent_id in first_line:
            raise TraceError(
                source,
                f"duplicate agent id {agent.agent_id!r} (first seen on line "
                f"{first_line[agent.agent_id]}); agent ids must be unique",
                line=number,
                field="agent_id",
            )
        first_line[agent.agent_id] = number
        prefix = agent.shared_prefix
        if prefix is not None:
            tokens, where = prefix_seen.setdefault(prefix.id, (prefix.tokens, number))
            if tokens != prefix.tokens:
                raise TraceError(
                    source,
                    f"shared prefix {prefix.id!r} has {tokens} tokens on line {where}, "
                    f"got {prefix.tokens}; one prefix id must always have the same length",
                    line=number,
                    field="shared_prefix.tokens",
                )
        agents.append(agent)
    if not agents:
        raise TraceError(source, "trace has no agents (every line is blank)")
    return Trace(agents=tuple(agents))


def load_trace(path: str | Path) -> Trace:
    """Read a native JSONL trace file; every problem becomes a :class:`TraceError`."""
    source = str(path)
    try:
        with Path(path).open(encoding="utf-8") as handle:
            return parse_trace(handle, source)
    except OSError as exc:
        raise TraceError(source, f"cannot read trace file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(source, f"not UTF-8 text: {exc.reason}") from None


# --------------------------------------------------------------------------- writing


def to_jsonl(trace: Trace) -> str:
    """The native JSONL text of ``trace`` (one agent per line, trailing newline)."""
    return "".join(agent.model_dump_json(exclude_none=True) + "\n" for agent in trace.agents)


def dump_trace(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` to ``path`` in the native JSONL format."""
    Path(path).write_text(to_jsonl(trace), encoding="utf-8")


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """Headline numbers of a trace, for reports such as ``concur sim info``.

    ``prefill_tokens_no_cache`` is what an engine prefills with no prefix reuse at all
    (every step's whole prompt); ``prefill_tokens_ideal`` is what it prefills with a
    perfect, unbounded prefix cache (each new input once, each shared prefix once).
    """

    agents: int
    steps: int
    min_steps: int
    max_steps: int
    total_input_tokens: int
    total_output_tokens: int
    peak_context_tokens: int
    max_prompt_tokens: int
    first_arrival_s: float
    last_arrival_s: float
    total_tool_latency_s: float
    shared_prefixes: int
    prefill_tokens_no_cache: int
    prefill_tokens_ideal: int

    @property
    def arrival_span_s(self) -> float:
        """Time between the first and the last agent arrival."""
        return self.last_arrival_s - self.first_arrival_s

    @property
    def mean_steps(self) -> float:
        """Average steps per agent."""
        return self.steps / self.agents

    def lines(self) -> list[str]:
        """Human-readable ``label: value`` lines."""
        return [
            f"agents: {self.agents}",
            f"steps: {self.steps} ({self.min_steps}-{self.max_steps} per agent, "
            f"mean {self.mean_steps:.1f})",
            f"input tokens: {self.total_input_tokens:,}",
            f"output tokens: {self.total_output_tokens:,}",
            f"peak context: {self.peak_context_tokens:,} tokens "
            f"(longest prompt {self.max_prompt_tokens:,})",
            f"arrivals: {self.first_arrival_s:.3f}-{self.last_arrival_s:.3f} s "
            f"(span {self.arrival_span_s:.3f} s)",
            f"tool time: {self.total_tool_latency_s:,.1f} s in total",
            f"shared prefixes: {self.shared_prefixes}",
            f"prefill tokens: {self.prefill_tokens_no_cache:,} with no cache, "
            f"{self.prefill_tokens_ideal:,} with a perfect prefix cache",
        ]


def summarize(trace: Trace) -> TraceSummary:
    """Compute the :class:`TraceSummary` of ``trace``."""
    agents = trace.agents
    step_counts = [len(agent.steps) for agent in agents]
    prefixes: dict[str, int] = {}
    shared_reuse = 0
    for agent in agents:
        prefix = agent.shared_prefix
        if prefix is None:
            continue
        if prefix.id in prefixes:
            shared_reuse += prefix.tokens
        prefixes[prefix.id] = prefix.tokens
    total_input = sum(agent.total_input_tokens for agent in agents)
    return TraceSummary(
        agents=len(agents),
        steps=sum(step_counts),
        min_steps=min(step_counts),
        max_steps=max(step_counts),
        total_input_tokens=total_input,
        total_output_tokens=sum(agent.total_output_tokens for agent in agents),
        peak_context_tokens=max(agent.max_context_tokens for agent in agents),
        max_prompt_tokens=max(agent.max_prompt_tokens for agent in agents),
        first_arrival_s=min(agent.arrival_s for agent in agents),
        last_arrival_s=max(agent.arrival_s for agent in agents),
        total_tool_latency_s=sum(agent.total_tool_latency_s for agent in agents),
        shared_prefixes=len(prefixes),
        prefill_tokens_no_cache=sum(sum(agent.prompt_tokens) for agent in agents),
        prefill_tokens_ideal=total_input - shared_reuse,
    )
