"""SGLang adapter: ``GET /metrics`` (Prometheus text) -> :class:`EngineSignal`.

Checked against SGLang 0.5.23 (PyPI wheel),
``sglang/srt/observability/metrics_collector.py`` (``SchedulerMetricsCollector``):

* gauges ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage`` (0-1), ``sglang:cache_hit_rate`` (0-1, the scheduler's
  recent prefix hit rate) and ``sglang:max_total_num_tokens`` (KV pool size in
  tokens, set once at start-up), all ``multiprocess_mode="mostrecent"``;
* labels ``model_name, engine_type, tp_rank, pp_rank, moe_ep_rank`` plus
  ``dp_rank`` under data parallelism and ``priority`` under priority scheduling.
  With priority scheduling the running and queue gauges carry the total under
  ``priority=""`` and a breakdown under ``priority="<n>"``; the breakdown is
  skipped here so it is not counted twice;
* SGLang serves ``/metrics`` from the tokenizer process in prometheus_client
  multiprocess mode: labels sorted, no ``_created`` series.

Retractions (SGLang's preemption): ``sglang:num_retracted_reqs`` is a **gauge**
(default ``multiprocess_mode``, so it carries a ``pid`` label) holding the
number of requests retracted since the previous stats log, reset to 0 after
each log. It is not cumulative, so it cannot be a ``preemptions_total``: a
reading between two logs would be lost or counted twice. It is ignored;
``preemptions_total`` comes from the **counter**
``sglang:num_retracted_requests_total`` that the same collector exports, and
is None (unknown) on versions without it.

Aggregation: series are grouped by ``(model_name, dp_rank)``; within a group
(tensor/pipeline ranks reporting the same scheduler) values are combined with
max; across groups counts and counters are summed, usage is the max and the hit
rate is the mean.
"""

from __future__ import annotations

from collections.abc import Mapping

from concur.adapters.errors import AdapterError
from concur.adapters.exposition import (
    Combine,
    Exposition,
    as_count,
    fold,
    groups,
    mean,
    parse_exposition,
)
from concur.adapters.signal import EngineSignal, series_total

GROUP_BY = ("model_name", "dp_rank")
"""The labels that tell one scheduler (DP rank of one model) from another."""

RUNNING = "sglang:num_running_reqs"
QUEUED = "sglang:num_queue_reqs"
TOKEN_USAGE = "sglang:token_usage"
CACHE_HIT_RATE = "sglang:cache_hit_rate"
CAPACITY = "sglang:max_total_num_tokens"
RETRACTED_TOTAL = "sglang:num_retracted_requests_total"
READ = frozenset({RUNNING, QUEUED, TOKEN_USAGE, CACHE_HIT_RATE, CAPACITY, RETRACTED_TOTAL})
"""Every sample name this adapter reads; the rest of the page is not parsed."""


def parse(text: str, timestamp: float) -> EngineSignal:
    """Read an SGLang ``/metrics`` page into a signal.

    A metric the page does not have reads as None. Raises
    :class:`~concur.adapters.errors.AdapterError` when the text is not a
    Prometheus exposition or carries no ``sglang:`` metric at all.
    """
    page = parse_exposition(text, source="SGLang", keep=READ)
    if not page.has_prefix("sglang:"):
        raise AdapterError(
            "the metrics page has no sglang:* metric: check that the URL points at an "
            "SGLang server started with --enable-metrics"
        )
    capacity = _fold(page, CAPACITY, across=sum)
    retracted = groups(page.samples(RETRACTED_TOTAL), GROUP_BY, _is_total)
    series = tuple(("preemptions", key, max(values)) for key, values in sorted(retracted.items()))
    return EngineSignal(
        timestamp=timestamp,
        kv_usage=_fold(page, TOKEN_USAGE, across=max),
        running=as_count(_fold(page, RUNNING, across=sum)),
        waiting=as_count(_fold(page, QUEUED, across=sum)),
        preemptions_total=series_total(series, "preemptions"),
        hit_rate=_fold(page, CACHE_HIT_RATE, across=mean),
        kv_capacity_tokens=round(capacity) if capacity is not None and capacity > 0 else None,
        engines=_engines(page),
        counter_series=series,
    )


def _is_total(labels: Mapping[str, str]) -> bool:
    """Skips the per-priority breakdown series (``priority="<n>"``)."""
    return labels.get("priority", "") == ""


def _fold(page: Exposition, name: str, *, across: Combine) -> float | None:
    return fold(page.samples(name), group_by=GROUP_BY, within=max, across=across, where=_is_total)


def _engines(page: Exposition) -> int | None:
    seen: set[tuple[str, ...]] = set()
    for name in (RUNNING, QUEUED, TOKEN_USAGE):
        seen.update(groups(page.samples(name), GROUP_BY, _is_total))
    return len(seen) or None
