"""Pressure: how close the engine's KV cache is to thrashing, as a 0-1 fraction.

Three sources, combined by taking the maximum of those selected:

``kv``
    The engine's own KV usage. vLLM counts only blocks held by *running*
    requests, so agents paused on tool calls are invisible to it.
``working_set``
    Live agents' context tokens over the KV capacity: what the cache must hold
    for every live agent to find its prefix on return.
``projected``
    The working set plus the expected further growth of live agents' contexts,
    learned online: anticipates growth that admission alone cannot undo.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from concur.policies.base import Observation

PressureSource = Literal["kv", "working_set", "projected"]
PRESSURE_SOURCES: tuple[str, ...] = get_args(PressureSource)


def parse_sources(value: str | Iterable[str]) -> tuple[PressureSource, ...]:
    """Parse ``"kv,working_set"``, ``"max(kv,working_set)"`` or a list of names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("max(") and text.endswith(")"):
            text = text[4:-1]
        items = [p.strip() for p in text.replace("+", ",").split(",") if p.strip()]
    else:
        items = [str(p).strip() for p in value]
    if not items:
        raise ValueError(f"choose at least one pressure source from {', '.join(PRESSURE_SOURCES)}")
    out: list[PressureSource] = []
    for item in items:
        if item not in PRESSURE_SOURCES:
            raise ValueError(
                f"unknown pressure source {item!r}; allowed: {', '.join(PRESSURE_SOURCES)}"
            )
        if item not in out:
            out.append(item)  # type: ignore[arg-type]
    return tuple(out)


def parts(obs: Observation, extra_tokens: int = 0) -> dict[str, float | None]:
    """Every pressure source's value for this observation (``None`` when unknown).

    ``extra_tokens`` adds context that is not live yet (a candidate being
    considered for admission) to the working-set sources.
    """
    cap = obs.capacity_tokens
    if cap is None or cap <= 0:
        ws: float | None = None
        proj: float | None = None
    else:
        ws = (obs.live_tokens + extra_tokens) / cap
        proj = (obs.live_tokens + extra_tokens + obs.growth_tokens) / cap
    return {"kv": obs.kv_usage, "working_set": ws, "projected": proj}


def combine(values: dict[str, float | None], sources: Iterable[str]) -> float | None:
    """Maximum of the selected, known sources; ``None`` when all are unknown."""
    known = [v for s in sources if (v := values.get(s)) is not None]
    return max(known) if known else None


def fitting_candidates(obs: Observation, sources: Iterable[str], limit: float) -> int:
    """How many waiting agents, in release order, fit while pressure stays <= ``limit``.

    Each candidate's context is added to the working-set sources; engine KV
    usage cannot be projected, so it only has to be under ``limit`` already.
    """
    chosen = tuple(sources)
    count = 0
    extra = 0
    for ctx in obs.candidate_contexts:
        trial = combine(parts(obs, extra + ctx), chosen)
        if trial is None or trial > limit:
            break
        extra += ctx
        count += 1
    return count
