"""The engine-side priority of an agent's step: fewest steps first.

concur's window decides *which* agents run; within the engine, requests still compete
for the KV cache and the batch. vLLM serves them by a ``priority`` field of the request
body (lowest first) when it runs with ``--scheduling-policy priority``: its waiting
queue is ordered by it, and when the cache is full the lowest-priority running request
is the one preempted. Its default scheduler, first come first served, ignores the field.

concur stamps each agent step with the number of steps its agent has already done. An
agent that arrived late, and whose remaining steps make the swarm's critical path, is
then not queued behind agents that are far along; all the agents progress at about the
same rate, like processor sharing by attained service. A request that sets its own
``priority`` keeps it.

The field is spliced in front of the client's own bytes, as the ``stream_options``
injection is (:func:`concur.usage.splice_member`): nothing is re-encoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from concur._gate_model import Agent
from concur.usage import JSON_WHITESPACE, skip_space, splice_member

__all__ = ["EnginePriority", "enabled", "may_stamp", "of", "stamp"]

EnginePriority = Literal["auto", "fewest-steps", "off"]

_KEY = b'"priority"'


def enabled(setting: EnginePriority, engine_kind: str) -> bool:
    """Whether steps are stamped: ``auto`` is ``fewest-steps`` for vLLM (whose default
    scheduler ignores the field) and ``off`` for engines that may reject it."""
    if setting == "auto":
        return engine_kind == "vllm"
    return setting == "fewest-steps"


def of(agent: Agent) -> int:
    """The priority of ``agent``'s next step: the steps it has done (the proxy stamps it;
    the simulator's runner hands it to its engine)."""
    return agent.requests


def may_stamp(body: bytes, parsed: Mapping[str, Any] | None) -> bool:
    """Whether ``body`` is a JSON object without a ``priority`` of its own.

    With the body parsed, that is read from it; else from its bytes: braces at both ends,
    and no ``"priority"`` anywhere in it (conservative: a tool schema with a property of
    that name keeps the request unstamped, which the engine serves as priority 0). A body
    that is not an object goes as it came, for the engine to say what is wrong with it.
    """
    if parsed is not None:
        return "priority" not in parsed
    start = skip_space(body)
    end = len(body.rstrip(JSON_WHITESPACE)) if body[-1:] in JSON_WHITESPACE else len(body)
    return body[start : start + 1] == b"{" and body[end - 1 : end] == b"}" and _KEY not in body


def stamp(body: bytes, priority: int) -> bytes:
    """``body`` (a JSON object, :func:`may_stamp`) with ``"priority": priority`` first."""
    stamped = splice_member(body, b'"priority":%d' % priority)
    assert stamped is not None, "stamp() takes what may_stamp() allowed: a JSON object"
    return stamped
