"""What a simulator run should show a reader: a policy set sized to the trace, and a
closing text that says what each policy held back, what to look at and, when the KV
cache never came under pressure, which ``--kv-tokens`` would put it under some.

:func:`default_policies` is ``concur sim run``'s set when no ``--policy`` is given:
no control, one static cap sized to the cache (only when it is below the trace's agent
count: a cap that never binds is no control at all), CONCUR's paper law, and concur's
law twice, as it runs by default (``aimd``: engine-aware, it may open up while the
engine idles) and with the working set always kept resident (``aimd:cache``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from concur.sim.runner import RunResult, Sample
from concur.sim.trace import Trace

__all__ = [
    "CONTROLLED",
    "HeldBack",
    "closing_text",
    "default_policies",
    "held_back",
    "kv_tokens_hint",
    "peak_working_set",
    "static_cap",
]

CONTROLLED = ("aimd:paper", "aimd:cache", "aimd")
"""The laws of the default set, after ``unlimited`` and the static cap."""

PAUSED = "paused at step boundaries"
PRESSURE_HIGH = 0.85
"""Working set over KV capacity above which the default law sees congestion."""

LOOK = (
    "What to look at: **hits** (the prefix-cache hit rate) and **recomp** (the share of "
    "prefill spent on context computed before and evicted) say whether the cache thrashed; "
    "**wait s** is how long agents queued before their first request. In timeseries.png, "
    "each policy's live agents against its window (dashed; drawn at the top while there "
    "is no limit) and its queued + paused agents show what it held back; the dotted "
    "working set against the 85% line is the pressure it reacted to."
)


def static_cap(trace: Trace, capacity_tokens: int) -> int | None:
    """How many agents the KV cache holds at their mean final context, or ``None`` when
    that is every agent of the trace (the cap would never bind)."""
    finals = [a.max_context_tokens for a in trace.agents]
    if not finals:
        return None
    mean = sum(finals) / len(finals)
    cap = max(1, int(capacity_tokens // max(1.0, mean)))
    return cap if cap < len(finals) else None


def default_policies(trace: Trace, capacity_tokens: int) -> list[str]:
    """``unlimited``, ``static:N`` (see :func:`static_cap`, left out when it never binds),
    ``aimd:paper``, ``aimd:cache`` and ``aimd``: five lines at most on the plots."""
    cap = static_cap(trace, capacity_tokens)
    statics = [] if cap is None else [f"static:{cap}"]
    return ["unlimited", *statics, *CONTROLLED]


@dataclass(frozen=True, slots=True)
class HeldBack:
    """What one run's policy held back, from its samples."""

    policy: str
    most: int
    """The most agents waiting at once (paused + queued)."""
    paused: int
    """The most paused at once (held at a step boundary)."""
    queued: int
    """The most queued at once (before their first request)."""
    open_s: float
    """Seconds the law spent open (no limit, nobody paused) while it had a window before."""


def held_back(result: RunResult) -> HeldBack:
    s = result.samples
    open_s = _seconds(s, lambda x: x.reason == "open")
    return HeldBack(
        policy=result.summary.policy,
        most=max((x.paused + x.queued for x in s), default=0),
        paused=max((x.paused for x in s), default=0),
        queued=max((x.queued for x in s), default=0),
        open_s=open_s,
    )


def _seconds(samples: Sequence[Sample], pred: Callable[[Sample], bool]) -> float:
    """Time covered by samples for which ``pred`` holds (each lasting to the next)."""
    total = 0.0
    for a, b in itertools.pairwise(samples):
        if pred(a):
            total += b.t - a.t
    return total


def peak_working_set(results: Sequence[RunResult], capacity_tokens: int) -> int | None:
    """The live agents' context tokens at their peak without control (the ``unlimited`` run,
    else the largest of any run); ``None`` when no run reported a working set."""
    base = [r for r in results if r.summary.policy == "unlimited"] or list(results)
    shares = [x.working_set for r in base for x in r.samples if x.working_set is not None]
    return round(max(shares) * capacity_tokens) if shares else None


def kv_tokens_hint(peak_tokens: int, longest_context: int) -> int:
    """A KV capacity that puts the agents under pressure: half their peak working set,
    in thousands, and never below what the longest agent needs with room to spare."""
    half = math.ceil(peak_tokens / 2 / 1000) * 1000
    room = math.ceil(1.5 * longest_context / 1000) * 1000
    return max(1000, half, room)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _held_sentence(held: Sequence[HeldBack]) -> str:
    parts: list[str] = []
    for h in held:
        if h.most == 0 and h.open_s == 0:
            parts.append(f"{h.policy} held no agent back")
            continue
        what = f"{h.policy} held up to {h.most} agents back at once"
        how = [f"up to {n} {verb}" for n, verb in ((h.paused, PAUSED), (h.queued, "queued")) if n]
        if how:
            what += f" ({', '.join(how)})"
        if h.open_s > 0:
            what += f" and was open (no limit) for {h.open_s:,.0f} s"
        parts.append(what)
    return "; ".join(parts) + "."


def closing_text(
    results: Sequence[RunResult], capacity_tokens: int | None, trace: Trace | None = None
) -> str:
    """What each policy held back, what to look at, and a ``--kv-tokens`` hint when the
    cache never filled (markdown, one paragraph per point)."""
    controlled = [held_back(r) for r in results if r.summary.policy != "unlimited"]
    paragraphs: list[str] = []
    if controlled:
        paragraphs.append(_held_sentence(controlled))
    paragraphs.append(LOOK)
    if capacity_tokens:
        hint = _hint(results, capacity_tokens, trace)
        if hint:
            paragraphs.append(hint)
    return "\n\n".join(paragraphs)


def _hint(results: Sequence[RunResult], capacity: int, trace: Trace | None) -> str | None:
    peak = peak_working_set(results, capacity)
    if peak is None or peak > PRESSURE_HIGH * capacity:
        return None
    if any(r.summary.preemptions for r in results):
        return None
    longest = max((a.max_context_tokens for a in trace.agents), default=0) if trace else 0
    kv = kv_tokens_hint(peak, longest)
    return (
        f"**The KV cache never came under pressure**: without control the agents' working "
        f"set peaked at {peak:,} tokens, {_pct(peak / capacity)} of the {capacity:,}-token "
        "cache, so no policy had anything to gain and any limit could only slow agents down. "
        f"To see admission control at work, give the engine a smaller cache, e.g. "
        f"`--kv-tokens {kv}` (about half that peak)."
    )
