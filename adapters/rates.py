"""Per-interval rates from two successive engine signals.

Engines export cumulative counters (prefix-cache hits and queries, preemptions);
a control law wants what happened *since the last reading*. :func:`derive` is
pure: it compares two :class:`EngineSignal` readings and nothing else.

Counter resets: when any counter present in both readings went backwards, the
engine restarted between them (or one of its data-parallel ranks did). Then
every delta is taken from a zero baseline, i.e. the current value is the delta,
as Prometheus's ``increase()`` does: a restarted counter counts from zero, so its
current value is what happened since the restart. ``reset`` is set so callers
can log it or discard the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from concur.adapters.signal import EngineSignal


@dataclass(frozen=True, slots=True)
class Rates:
    """What happened between two readings."""

    hit_rate: float | None
    """Prefix-cache hit rate over the interval (delta hits / delta queries, 0-1).

    Falls back to the engine's own hit-rate gauge (SGLang, vLLM V0) when the
    counters are not available in both readings; None when no query was made in
    the interval or nothing is known.
    """
    new_preemptions: float | None
    """Preemptions in the interval; None without the counter in both readings."""
    reset: bool
    """A counter went backwards (engine restart); deltas used a zero baseline."""


def derive(prev: EngineSignal | None, cur: EngineSignal) -> Rates:
    """The rates over the interval from ``prev`` to ``cur`` (``prev`` None: first reading)."""
    if prev is None:
        return Rates(hit_rate=cur.hit_rate, new_preemptions=None, reset=False)
    pairs = (
        (prev.prefix_hits_total, cur.prefix_hits_total),
        (prev.prefix_queries_total, cur.prefix_queries_total),
        (prev.preemptions_total, cur.preemptions_total),
    )
    reset = any(before is not None and now is not None and now < before for before, now in pairs)
    hits = _delta(prev.prefix_hits_total, cur.prefix_hits_total, reset)
    queries = _delta(prev.prefix_queries_total, cur.prefix_queries_total, reset)
    if hits is None or queries is None:
        hit_rate = cur.hit_rate
    elif queries > 0:
        hit_rate = min(1.0, max(0.0, hits / queries))
    else:
        hit_rate = None
    return Rates(
        hit_rate=hit_rate,
        new_preemptions=_delta(prev.preemptions_total, cur.preemptions_total, reset),
        reset=reset,
    )


def _delta(before: float | None, now: float | None, reset: bool) -> float | None:
    if before is None or now is None:
        return None
    return now if reset else now - before
