"""Overload protection's metrics, read from the proxy at scrape time.

* ``concur_held_body_bytes``: bytes of agent steps' request bodies held (being read,
  waiting at the gate or on their way upstream), against
  ``concur_held_body_bytes_limit`` (``server.max_held_bytes``; +Inf: no budget); the
  refusals are ``concur_admissions_total{outcome="overloaded"}``;
* ``concur_upstream_connections{state}``: connections to the engine, ``idle`` in the
  pool or ``busy`` (carrying a request, or being opened), against
  ``upstream.max_connections``; ``concur_upstream_connection_waiting``: requests
  waiting for one now, ``concur_upstream_connection_waits_total`` all that did;
* ``concur_upstream_retries_total``: requests sent again on a fresh connection (the
  keep-alive race); ``concur_upstream_stale_connections_total``: idle connections
  found closed by the engine when about to be used, dropped unused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Metric
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from concur.proxy import Proxy


class OverloadStats:
    """A collector for one proxy's budget and upstream pool (see the module docstring)."""

    def __init__(self) -> None:
        self.proxy: Proxy | None = None
        """The proxy read at each scrape (set by the runtime; None: every value 0)."""

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        budget = proxy.budget if proxy is not None else None
        up = proxy.upstream if proxy is not None else None
        yield GaugeMetricFamily(
            "concur_held_body_bytes",
            "Bytes of agent steps' request bodies held (read, waiting at the gate, in flight)",
            value=budget.held if budget is not None else 0,
        )
        limit = budget.limit if budget is not None else None
        yield GaugeMetricFamily(
            "concur_held_body_bytes_limit",
            "Budget of the held request bodies, server.max_held_bytes (+Inf = none)",
            value=math.inf if limit is None else limit,
        )
        connections = GaugeMetricFamily(
            "concur_upstream_connections",
            "Connections to the engine: idle in the pool, or busy (in use or opening)",
            labels=["state"],
        )
        idle = sum(1 for conn in up._idle if not conn.closed) if up is not None else 0
        connections.add_metric(["idle"], idle)
        connections.add_metric(["busy"], max(0, up.open - idle) if up is not None else 0)
        yield connections
        yield GaugeMetricFamily(
            "concur_upstream_connection_waiting",
            "Requests waiting for a connection to the engine (upstream.max_connections)",
            value=up.waiting if up is not None else 0,
        )
        yield CounterMetricFamily(
            "concur_upstream_connection_waits",
            "Requests that waited for a connection to the engine",
            value=up.waits if up is not None else 0,
        )
        yield CounterMetricFamily(
            "concur_upstream_retries",
            "Requests sent again on a fresh connection after a reused one was found closed",
            value=up.retries if up is not None else 0,
        )
        yield CounterMetricFamily(
            "concur_upstream_stale_connections",
            "Idle connections found closed by the engine when about to be used",
            value=up.discarded if up is not None else 0,
        )
