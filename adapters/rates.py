"""Per-interval rates from two successive engine signals.

Engines export cumulative counters (prefix-cache hits and queries, preemptions);
a control law wants what happened *since the last reading*. :func:`derive` is
pure: it compares two :class:`EngineSignal` readings and nothing else.

Counter resets: a counter that went backwards was restarted between the two
readings; its delta is taken from a zero baseline, i.e. its current value is the
delta, as Prometheus's ``increase()`` does: a restarted counter counts from zero,
so its current value is what happened since the restart. ``reset`` is set so
callers can log it or discard the interval.

With per-engine counters (:attr:`EngineSignal.counter_series`, several
data-parallel ranks) this is done per engine, as ``increase()`` does per series,
and the deltas are summed: one rank's restart resets only its own baseline, and a
rank missing from either reading adds nothing (it has no baseline). Without them
the totals are compared, and a total that went backwards resets all of them.
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
    if prev.counter_series and cur.counter_series:
        return _derive_per_engine(prev, cur)
    pairs = (
        (prev.prefix_hits_total, cur.prefix_hits_total),
        (prev.prefix_queries_total, cur.prefix_queries_total),
        (prev.preemptions_total, cur.preemptions_total),
    )
    reset = any(before is not None and now is not None and now < before for before, now in pairs)
    hits = _delta(prev.prefix_hits_total, cur.prefix_hits_total, reset)
    queries = _delta(prev.prefix_queries_total, cur.prefix_queries_total, reset)
    return _rates(
        cur, hits, queries, _delta(prev.preemptions_total, cur.preemptions_total, reset), reset
    )


def _derive_per_engine(prev: EngineSignal, cur: EngineSignal) -> Rates:
    before = _by_counter(prev)
    now = _by_counter(cur)
    reset = False
    deltas: dict[str, float | None] = {}
    for counter in ("prefix_hits", "prefix_queries", "preemptions"):
        old, new = before.get(counter, {}), now.get(counter, {})
        common = old.keys() & new.keys()
        if not common:
            deltas[counter] = None
            continue
        total = 0.0
        for engine in common:
            if new[engine] < old[engine]:
                reset = True
                total += new[engine]
            else:
                total += new[engine] - old[engine]
        deltas[counter] = total
    return _rates(
        cur, deltas["prefix_hits"], deltas["prefix_queries"], deltas["preemptions"], reset
    )


def _by_counter(signal: EngineSignal) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for counter, engine, value in signal.counter_series:
        out.setdefault(counter, {})[engine] = value
    return out


def _rates(
    cur: EngineSignal,
    hits: float | None,
    queries: float | None,
    preemptions: float | None,
    reset: bool,
) -> Rates:
    if hits is None or queries is None:
        hit_rate = cur.hit_rate
    elif queries > 0:
        hit_rate = min(1.0, max(0.0, hits / queries))
    else:
        hit_rate = None
    return Rates(hit_rate=hit_rate, new_preemptions=preemptions, reset=reset)


def _delta(before: float | None, now: float | None, reset: bool) -> float | None:
    if before is None or now is None:
        return None
    return now if reset else now - before


class IntervalRates:
    """:func:`derive` over the readings one consumer sees, tick by tick.

    Each reading counts once: a poller slower than the control loop hands the same
    reading (same ``timestamp``) to several ticks; its rates stand, but its new
    preemptions were counted at the tick that first saw it (``0.0`` after that). The
    KV capacity last reported is kept while later readings lack it.
    """

    __slots__ = ("_prev", "_rates", "capacity_tokens")

    def __init__(self) -> None:
        self._prev: EngineSignal | None = None
        self._rates = Rates(hit_rate=None, new_preemptions=None, reset=False)
        self.capacity_tokens: int | None = None
        """The engine's KV capacity in tokens, as last reported (None: never)."""

    def update(self, signal: EngineSignal) -> Rates:
        """The rates for a tick that sees ``signal``."""
        if self._prev is None or signal.timestamp != self._prev.timestamp:
            self._rates = derive(self._prev, signal)
            self._prev = signal
            rates = self._rates
        else:
            rates = Rates(self._rates.hit_rate, new_preemptions=0.0, reset=self._rates.reset)
        if signal.kv_capacity_tokens is not None:
            self.capacity_tokens = signal.kv_capacity_tokens
        return rates
