"""vLLM adapter: ``GET /metrics`` (Prometheus text) -> :class:`EngineSignal`.

Checked against vLLM's own source, as shipped in the PyPI wheels:

* 0.6.6, ``vllm/engine/metrics.py`` (V0): labels ``{model_name}`` only;
  ``vllm:gpu_cache_usage_perc``, ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:num_preemptions_total`` (counter); the
  prefix cache is a *gauge* ``vllm:gpu_prefix_cache_hit_rate`` (a lifetime block
  hit rate, ``-1`` when prefix caching is off), no hit/query counters;
  ``vllm:cache_config_info`` is a gauge whose labels are every ``CacheConfig``
  field (``block_size``, ``num_gpu_blocks``, ``num_gpu_blocks_override``, ...).
  That module calls ``prometheus_client.disable_created_metrics()``, so V0 pages
  carry no ``_created`` series; by default its API server runs in multiprocess
  mode (sorted labels).
* 0.8-0.10, ``vllm/v1/metrics/loggers.py`` (V1): labels ``{model_name, engine}``
  (``engine`` is the data-parallel rank); counters
  ``vllm:gpu_prefix_cache_queries_total`` / ``vllm:gpu_prefix_cache_hits_total``
  (0.8 counted blocks, later tokens; the ratio is what matters), renamed in 0.9.2
  to ``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``, and
  ``vllm:gpu_cache_usage_perc`` renamed to ``vllm:kv_cache_usage_perc``.
* 0.11.0, same file: the old names only with ``--show-hidden-metrics-for-version``;
  ``cache_config_info`` gains an ``engine`` label, one series per DP rank. V1 does
  not disable ``_created`` series, so a single API server shows them; with
  ``--api-server-count > 1`` it switches to multiprocess mode (labels sorted, no
  ``_created``; ``kv_cache_usage_perc`` has no ``multiprocess_mode`` there, so it
  gets one series per API-server ``pid``).
* 0.33.0, same file: adds ``vllm:num_requests_waiting_by_reason{reason}`` (capacity
  and deferred; their sum is ``num_requests_waiting``) and
  ``vllm:admission_rejections_total{model_name, reason}`` (no ``engine`` label);
  ``cache_config_info`` gains ``kv_cache_size_tokens``, the group-aware capacity
  of *one* DP rank; with DP > 1 the API-server count defaults to the DP size, so
  such pages come in multiprocess mode.

Capacity trap (``vllm/v1/engine/utils.py`` in 0.11, ``core_client.py`` in 0.33):
the front end *sums* ``num_gpu_blocks`` over all DP ranks into its one
``CacheConfig`` and writes that same total on every rank's ``cache_config_info``
series. So ``num_gpu_blocks x block_size`` is already the total and is taken once
(the max over series), never summed; ``kv_cache_size_tokens`` is per rank and is
summed over distinct ``engine`` values, and preferred when present.

Aggregation: series are grouped by ``(model_name, engine)``; duplicates within a
group (one per process in multiprocess mode) are combined with max; groups are
combined by summing counts and counters and taking the max of usage.
"""

from __future__ import annotations

from collections.abc import Sequence

from concur.adapters.errors import AdapterError
from concur.adapters.exposition import (
    Combine,
    Exposition,
    as_count,
    fold,
    groups,
    label_int,
    mean,
    parse_exposition,
)
from concur.adapters.signal import CounterSeries, EngineSignal, series_total

GROUP_BY = ("model_name", "engine")
"""The labels that tell one engine (DP rank of one model) from another."""

KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PREEMPTIONS = "vllm:num_preemptions_total"
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
HIT_RATE_GAUGE = "vllm:gpu_prefix_cache_hit_rate"
CACHE_CONFIG = "vllm:cache_config_info"
COUNTERS = (
    ("preemptions", (PREEMPTIONS,)),
    ("prefix_hits", PREFIX_HITS),
    ("prefix_queries", PREFIX_QUERIES),
)
"""The counters whose rates concur takes, per engine (see :mod:`concur.adapters.rates`)."""
READ = frozenset(
    {*KV_USAGE, RUNNING, WAITING, PREEMPTIONS, *PREFIX_HITS, *PREFIX_QUERIES, HIT_RATE_GAUGE}
    | {CACHE_CONFIG}
)
"""Every sample name this adapter reads; the rest of the page is not parsed."""


def parse(text: str, timestamp: float) -> EngineSignal:
    """Read a vLLM ``/metrics`` page (any version from 0.6 on) into a signal.

    A metric the page does not have reads as None. Raises
    :class:`~concur.adapters.errors.AdapterError` when the text is not a
    Prometheus exposition or carries no ``vllm:`` metric at all.
    """
    page = parse_exposition(text, source="vLLM", keep=READ)
    if not page.has_prefix("vllm:"):
        raise AdapterError(
            "the metrics page has no vllm:* metric: check that the URL points at a vLLM "
            "server and that it was not started with --disable-log-stats"
        )
    series = _counter_series(page)
    hits = series_total(series, "prefix_hits")
    queries = series_total(series, "prefix_queries")
    return EngineSignal(
        timestamp=timestamp,
        kv_usage=_first(page, KV_USAGE, across=max),
        running=as_count(_first(page, (RUNNING,), across=sum)),
        waiting=as_count(_first(page, (WAITING,), across=sum)),
        preemptions_total=series_total(series, "preemptions"),
        prefix_hits_total=hits,
        prefix_queries_total=queries,
        hit_rate=_hit_rate_gauge(page) if hits is None or queries is None else None,
        kv_capacity_tokens=_capacity(page),
        engines=_engines(page),
        counter_series=series,
    )


def _first(page: Exposition, names: Sequence[str], *, across: Combine) -> float | None:
    """The first of ``names`` (newest name first) that the page has, folded."""
    for name in names:
        value = fold(page.samples(name), group_by=GROUP_BY, within=max, across=across)
        if value is not None:
            return value
    return None


def _counter_series(page: Exposition) -> CounterSeries:
    """Each counter per engine (the first of its names the page has; duplicates within an
    engine folded with max), for per-engine rates and, summed, the totals."""
    out: list[tuple[str, tuple[str, ...], float]] = []
    for counter, names in COUNTERS:
        for name in names:
            grouped = groups(page.samples(name), GROUP_BY)
            if grouped:
                out.extend((counter, key, max(values)) for key, values in sorted(grouped.items()))
                break
    return tuple(out)


def _hit_rate_gauge(page: Exposition) -> float | None:
    """V0's lifetime hit-rate gauge; its ``-1`` (prefix caching off) reads as unknown."""
    valid = [s for s in page.samples(HIT_RATE_GAUGE) if 0.0 <= s.value <= 1.0]
    return fold(valid, group_by=GROUP_BY, within=max, across=mean)


def _capacity(page: Exposition) -> int | None:
    """KV capacity in tokens from ``vllm:cache_config_info`` (see the module docstring)."""
    per_engine: dict[str, int] = {}
    totals: list[int] = []
    for sample in page.samples(CACHE_CONFIG):
        size = label_int(sample.labels, "kv_cache_size_tokens")
        if size is not None:
            engine = sample.labels.get("engine", "")
            per_engine[engine] = max(size, per_engine.get(engine, 0))
        blocks = label_int(sample.labels, "num_gpu_blocks")
        block_size = label_int(sample.labels, "block_size")
        if blocks is not None and block_size is not None:
            totals.append(blocks * block_size)
    if per_engine:
        return sum(per_engine.values())
    if totals:
        return max(totals)
    return None


def _engines(page: Exposition) -> int | None:
    """Distinct ``(model_name, engine)`` groups among the scheduler-state series."""
    seen: set[tuple[str, ...]] = set()
    for name in (RUNNING, WAITING, *KV_USAGE):
        seen.update(groups(page.samples(name), GROUP_BY))
    return len(seen) or None
