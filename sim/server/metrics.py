"""``GET /metrics`` of the simulated engine, in vLLM V1's names, types and labels.

Names, help texts, label names and buckets follow vLLM's
``vllm/v1/metrics/loggers.py`` as rendered in ``tests/fixtures/metrics/vllm-0.33.0.txt``
(one API server, one engine: labels ``model_name`` and ``engine="0"``, counters
with ``_created`` series). Scheduler state and counters are read from the engine
at scrape time by a custom collector; per-request histograms are observed when
requests finish. All durations are *simulated* seconds.

``vllm:cache_config_info`` carries ``num_gpu_blocks`` and ``block_size`` (their
product is the engine's KV capacity, as ``concur sim`` counts it) and
``kv_cache_size_tokens`` (the same number: one engine, no sliding window).

Each :class:`VllmMetrics` has its own ``CollectorRegistry``: two servers in one
process never share a series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from concur.sim.engine import EngineConfig
from concur.sim.scheduler import FinishedRequest

__all__ = ["KV_USAGE", "EngineCounters", "VllmMetrics"]

KV_USAGE = "vllm:kv_cache_usage_perc"
LABELS = ("model_name", "engine")

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def _buckets_1_2_5(limit: int) -> list[float]:
    """vLLM's ``build_1_2_5_buckets``: 1, 2, 5, 10, 20, 50, ... up to ``limit``."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > limit:
                return out
            out.append(float(value))
        exponent += 1


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """What the collector reads from the engine at scrape time."""

    kv_usage: float
    running: int
    waiting: int
    preemptions: int
    prefix_queries: int
    prefix_hits: int
    prompt_tokens: int
    generation_tokens: int
    finished: int
    aborted: int


class _EngineCollector:
    """Gauges and counters read from the engine when scraped."""

    def __init__(
        self,
        read: Callable[[], EngineCounters],
        model_name: str,
        cache_info: dict[str, str],
        created: float,
        omit: Callable[[], frozenset[str]],
    ) -> None:
        self._read = read
        self._labels = [model_name, "0"]
        self._cache_info = cache_info
        self._created = created
        self._omit = omit

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self._read()
        labels = self._labels
        created = self._created

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=LABELS)
            m.add_metric(labels, value, created=created)
            return m

        families: list[Metric] = [
            gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                c.running,
            ),
            gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                c.waiting,
            ),
            gauge(KV_USAGE, "KV-cache usage. 1 means 100 percent usage.", c.kv_usage),
            counter(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                c.prefix_queries,
            ),
            counter(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                c.prefix_hits,
            ),
            counter(
                "vllm:num_preemptions",
                "Cumulative number of preemption from the engine.",
                c.preemptions,
            ),
            counter("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens),
            counter(
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                c.generation_tokens,
            ),
        ]
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=(*LABELS, "finished_reason"),
        )
        for reason, value in (("stop", 0), ("length", c.finished), ("abort", c.aborted)):
            success.add_metric([*labels, reason], value, created=created)
        families.append(success)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=list(self._cache_info),
        )
        info.add_metric(list(self._cache_info.values()), 1.0)
        families.append(info)
        omit = self._omit()
        for family in families:
            if family.name not in omit:
                yield family


class VllmMetrics:
    """The metrics of one simulated engine, rendered as vLLM renders them."""

    def __init__(
        self,
        read: Callable[[], EngineCounters],
        *,
        model_name: str,
        config: EngineConfig,
        max_model_len: int,
        omit: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        capacity = config.kv_capacity_tokens
        cache_info = {
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "cache_hit_alignment_tokens": str(config.block_size),
            "effective_attention_block_size": str(config.block_size),
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "engine": "0",
            "gpu_memory_utilization": "0.9",
            "hash_block_size": str(config.block_size),
            "is_attention_free": "False",
            "kv_cache_dtype_skip_layers": "[]",
            "kv_cache_layout": "NHD",
            "kv_cache_max_concurrency": str(round(capacity / max_model_len, 2)),
            "kv_cache_memory_bytes": "None",
            "kv_cache_size_tokens": str(capacity),
            "kv_sharing_fast_prefill": "False",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(config.num_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
            "user_specified_block_size": "False",
        }
        self.registry.register(_EngineCollector(read, model_name, cache_info, time.time(), omit))
        labels = [model_name, "0"]

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            h = Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)
            return h.labels(*labels)

        self._ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        token_buckets = _buckets_1_2_5(max_model_len)
        self._prompt = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self._generation = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            token_buckets,
        )

    def observe_finish(self, fin: FinishedRequest) -> None:
        self._ttft.observe(fin.ttft)
        self._e2e.observe(fin.latency)
        self._queue.observe(max(0.0, fin.first_scheduled_time - fin.arrival_time))
        self._prompt.observe(fin.prompt_tokens)
        self._generation.observe(fin.output_tokens)

    def render(self) -> bytes:
        """The exposition text."""
        data: bytes = generate_latest(self.registry)
        return data
