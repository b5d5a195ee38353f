"""concur's own Prometheus metrics, in a registry owned by one :class:`ConcurMetrics`.

No module-level registry: each application (and each test) builds its own, so
two proxies in one process never share counters. Counters and histograms are
updated as things happen (gate events, ticks, upstream responses); gauges are
set from the gate and controller just before each scrape (:meth:`update`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from concur._overload_metrics import OverloadStats
from concur.admission import GateEvent
from concur.control import TickRecord

ADMISSION_OUTCOMES = (
    "admitted",
    "queued",
    "full",
    "timeout",
    "cancelled",
    "closed",
    "bypassed",
    "overloaded",
)
"""``concur_admissions_total{outcome}``: what happened to a new agent (or an anonymous,
ungated request: ``bypassed``). ``closed`` = refused while shutting down; ``overloaded``
= refused because its body did not fit in ``server.max_held_bytes``."""
AGENT_EVENTS = ("paused", "resumed", "ended", "held", "released", "gone")
"""``concur_agent_events_total{event}``; ``gone``: a client hung up mid-request (its
agent ends after ``admission.disconnect_grace`` unless it sends again)."""

QUEUE_WAIT_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True, slots=True)
class GaugeValues:
    """The instantaneous values behind the gauges (``None`` = unknown)."""

    window: int | None
    active: int
    live: int
    paused: int
    queued: int
    pressure: float | None
    kv_usage: float | None
    hit_rate: float | None
    signal_age: float | None
    parts: Mapping[str, float | None] = field(default_factory=dict)
    """The pressure's components at the last tick, by source (``kv``, ``working_set``, ...)."""


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


class ConcurMetrics:
    """The proxy's metrics and the registry they live in."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.window = Gauge(
            "concur_window", "Admission window: live agents allowed (+Inf = unlimited)", registry=r
        )
        self.agents_active = Gauge(
            "concur_agents_active", "Admitted agents (live + paused)", registry=r
        )
        self.agents_live = Gauge("concur_agents_live", "Admitted, not paused agents", registry=r)
        self.agents_paused = Gauge(
            "concur_agents_paused", "Admitted agents held at their next step", registry=r
        )
        self.agents_queued = Gauge(
            "concur_agents_queued", "New agents waiting for admission", registry=r
        )
        self.pressure = Gauge(
            "concur_pressure",
            "Pressure the policy acted on at the last tick (NaN = unknown)",
            registry=r,
        )
        self.pressure_part = Gauge(
            "concur_pressure_part",
            "One component of the pressure at the last tick, by source (NaN = unknown)",
            ["source"],
            registry=r,
        )
        self.engine_kv_usage = Gauge(
            "concur_engine_kv_usage", "Engine KV-cache usage, 0-1 (NaN = unknown)", registry=r
        )
        self.engine_hit_rate = Gauge(
            "concur_engine_hit_rate",
            "Engine prefix-cache hit rate over the last interval (NaN = unknown)",
            registry=r,
        )
        self.signal_age = Gauge(
            "concur_signal_age_seconds", "Age of the latest engine signal (NaN = none)", registry=r
        )
        self.admissions = Counter(
            "concur_admissions", "Admission outcomes of new agents", ["outcome"], registry=r
        )
        self.agent_events = Counter(
            "concur_agent_events",
            "Pauses, resumes, ends, hang-ups and held requests",
            ["event"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "concur_queue_wait_seconds",
            "Time new agents waited for admission",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.window_changes = Counter(
            "concur_window_changes", "Window changes by direction", ["direction"], registry=r
        )
        self.upstream = UpstreamStats()
        r.register(self.upstream)
        self.overload = OverloadStats()
        """Held bodies and the upstream pool (:mod:`concur._overload_metrics`)."""
        r.register(self.overload)
        # Labelled children looked up once: ``labels()`` costs more than the update itself.
        self._admission_children = {o: self.admissions.labels(o) for o in ADMISSION_OUTCOMES}
        self._event_children = {e: self.agent_events.labels(e) for e in AGENT_EVENTS}
        for direction in ("up", "down"):
            self.window_changes.labels(direction)

    # ---------------------------------------------------------------- events

    def on_gate_event(self, event: GateEvent) -> None:
        child = self._admission_children.get(event.kind)
        if child is not None:
            child.inc()
            if event.kind == "admitted" and event.waited is not None:
                self.queue_wait.observe(max(0.0, event.waited))
        else:
            child = self._event_children.get(event.kind)
            if child is not None:
                child.inc()

    def on_admission(self, outcome: str) -> None:
        """An outcome the gate does not emit itself (``closed``, ``bypassed``)."""
        child = self._admission_children.get(outcome)
        if child is None:
            child = self.admissions.labels(outcome)
        child.inc()

    def on_tick(self, record: TickRecord) -> None:
        direction = window_direction(record.window_before, record.decision.window)
        if direction is not None:
            self.window_changes.labels(direction).inc()

    def on_upstream(self, code: str, latency: float | None) -> None:
        self.upstream.observe(code, latency)

    # ----------------------------------------------------------------- scrape

    def update(self, values: GaugeValues) -> None:
        self.window.set(math.inf if values.window is None else values.window)
        self.agents_active.set(values.active)
        self.agents_live.set(values.live)
        self.agents_paused.set(values.paused)
        self.agents_queued.set(values.queued)
        self.pressure.set(_num(values.pressure))
        self.pressure_part.clear()  # a retuned policy may read other sources
        for source, value in values.parts.items():
            self.pressure_part.labels(source).set(_num(value))
        self.engine_kv_usage.set(_num(values.kv_usage))
        self.engine_hit_rate.set(_num(values.hit_rate))
        self.signal_age.set(_num(values.signal_age))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (without ``_created`` series)."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


class UpstreamStats:
    """``concur_upstream_requests_total{code}`` and ``concur_upstream_latency_seconds``.

    Updated once per proxied request, so kept as plain numbers (prometheus-client's
    labelled counter and histogram take a lock per update and cost several times more)
    and turned into the same two metric families at scrape time: a counter and a
    histogram with :data:`LATENCY_BUCKETS`, exactly as ``Counter``/``Histogram`` expose
    them (``tests/proxy/test_proxy_fastpath.py`` compares the two).
    """

    REQUESTS = "concur_upstream_requests"
    REQUESTS_HELP = "Upstream requests by HTTP status (or error, timeout, cancelled)"
    LATENCY = "concur_upstream_latency_seconds"
    LATENCY_HELP = "Time from sending a request upstream to its response headers"

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        self._codes: dict[str, int] = {}
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, code: str, latency: float | None) -> None:
        codes = self._codes
        codes[code] = codes.get(code, 0) + 1
        if latency is not None:
            self._sum += latency
            if latency <= math.inf:  # (a NaN, which cannot happen, counts in no bucket)
                self._counts[bisect_left(self._bounds, latency)] += 1

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.REQUESTS, self.REQUESTS_HELP, labels=["code"])
        yield HistogramMetricFamily(self.LATENCY, self.LATENCY_HELP)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(self.REQUESTS, self.REQUESTS_HELP, labels=["code"])
        for code, n in self._codes.items():
            requests.add_metric([code], float(n))
        yield requests
        latency = HistogramMetricFamily(self.LATENCY, self.LATENCY_HELP)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self._bounds, math.inf), self._counts, strict=True):
            total += n
            buckets.append((floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]
        latency.add_metric([], buckets, self._sum)
        yield latency


class _WithoutCreated:
    """A view of a registry that drops the ``*_created`` timestamps (as vLLM does).

    prometheus-client can only disable them process-wide; this keeps that global alone.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for metric in self._registry.collect():
            out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            out.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            if out.samples or metric.type not in ("counter", "histogram", "gauge"):
                yield out


def window_direction(before: int | None, after: int | None) -> str | None:
    """``up``, ``down`` or ``None`` (no change); ``None`` as a window means unlimited."""
    if before == after:
        return None
    if after is None:
        return "up"
    if before is None:
        return "down"
    return "up" if after > before else "down"
