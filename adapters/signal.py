"""The engine signal: what concur knows about an engine at one instant.

Every engine adapter (and the simulated engine) produces the same frozen
:class:`EngineSignal`, so policies cannot tell where a reading came from.
Every field except ``timestamp`` may be ``None``: a metric the engine did not
export is *unknown*, never zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CounterSeries = tuple[tuple[str, tuple[str, ...], float], ...]
"""Counters per engine: ``(counter, engine key, value)``, counter one of ``preemptions``,
``prefix_hits``, ``prefix_queries``."""


def series_total(series: CounterSeries, counter: str) -> float | None:
    """``counter`` summed over the engines in ``series``; None when none has it."""
    values = [value for name, _, value in series if name == counter]
    return sum(values) if values else None


@dataclass(frozen=True, slots=True)
class EngineSignal:
    """One reading of an engine's state.

    Counters (``preemptions_total``, ``prefix_hits_total``,
    ``prefix_queries_total``) are cumulative, as the engine exports them; the
    poller turns them into per-interval rates. ``hit_rate`` is set only by
    engines that export a hit-rate gauge directly (SGLang); for vLLM it is
    derived from the counters.
    """

    timestamp: float
    """When the reading was taken, on the caller's clock (monotonic or virtual)."""
    kv_usage: float | None = None
    """Fraction (0-1) of KV blocks held by running requests; evictable prefix cache is free."""
    running: int | None = None
    waiting: int | None = None
    preemptions_total: float | None = None
    prefix_hits_total: float | None = None
    """Prefix-cache hits in tokens (counter)."""
    prefix_queries_total: float | None = None
    """Prefix-cache queries in tokens (counter)."""
    hit_rate: float | None = None
    """A hit-rate gauge exported directly by the engine (SGLang), 0-1."""
    kv_capacity_tokens: int | None = None
    """KV cache capacity in tokens (num_gpu_blocks x block_size), summed over engines."""
    engines: int | None = None
    """How many engine instances (data-parallel ranks) the reading aggregates."""
    counter_series: CounterSeries = ()
    """The counters per engine (:data:`CounterSeries`; empty: only the totals are
    known), which the ``*_total`` fields sum. Rates are taken per engine, so one
    data-parallel rank restarting, or missing from one scrape, is not read as a burst
    of everything the others counted."""

    def at(self, timestamp: float) -> EngineSignal:
        """The same reading stamped with another time."""
        return replace(self, timestamp=timestamp)
