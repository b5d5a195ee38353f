"""Watch one live run: the engine's ``/metrics`` and concur's ``/concur/status`` over time.

:class:`Monitor` polls both every ``interval`` wall seconds while a swarm runs and
keeps a list of :class:`Sample` (times in simulated seconds, wall x ``speed``),
with the prefix-cache hit rate taken over each interval from the engine's
counters, as concur's controller does. :func:`engine_counters` reads the
cumulative counters of a final scrape for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from concur.adapters.errors import AdapterError
from concur.adapters.exposition import parse_exposition
from concur.adapters.signal import EngineSignal
from concur.adapters.vllm import parse

__all__ = ["Monitor", "Sample", "engine_counters"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading. ``t`` is simulated seconds since the run started."""

    t: float
    kv_usage: float | None
    hit_rate: float | None
    """Prefix-cache hits / queries since the previous sample (``None``: no queries)."""
    running: int | None
    waiting: int | None
    preemptions_total: float | None
    window: int | None = None
    """concur's window (``None``: unlimited, or no concur in this run)."""
    active: int | None = None
    live: int | None = None
    paused: int | None = None
    queued: int | None = None
    pressure: float | None = None
    decision: str | None = None
    """concur's last decision (``open``: the engine-aware law lifted its limit)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_counters(text: str) -> dict[str, float]:
    """Every counter (``*_total``) on a vLLM-style metrics page, summed over label sets."""
    page = parse_exposition(text, source="concur engine")
    out: dict[str, float] = {}
    for name, samples in page.by_name.items():
        if name.endswith("_total"):
            out[name] = sum(s.value for s in samples)
    return out


class Monitor:
    """Polls an engine (and optionally concur) in the background."""

    def __init__(
        self,
        engine_url: str,
        *,
        concur_url: str | None = None,
        speed: float = 1.0,
        interval: float = 0.5,
    ) -> None:
        self.engine_url = engine_url.rstrip("/")
        self.concur_url = concur_url.rstrip("/") if concur_url else None
        self.speed = speed
        self.interval = interval
        self.samples: list[Sample] = []
        self.errors = 0
        self._prev: EngineSignal | None = None
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None
        self._client = httpx.AsyncClient(timeout=5.0, trust_env=False)

    async def start(self) -> None:
        """Take a first reading now, then keep polling until :meth:`stop`."""
        self._t0 = time.monotonic()
        await self.poll()
        self._task = asyncio.create_task(self._loop(), name="demo-monitor")

    async def stop(self) -> None:
        """Stop polling after one last reading; closes the HTTP client."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.poll()
        await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll()

    async def poll(self) -> None:
        """One reading of both endpoints (a failed scrape is counted and skipped)."""
        t = (time.monotonic() - self._t0) * self.speed
        try:
            resp = await self._client.get(f"{self.engine_url}/metrics")
            resp.raise_for_status()
            sig = parse(resp.text, t)
        except (httpx.HTTPError, AdapterError):
            self.errors += 1
            return
        status: dict[str, Any] = {}
        if self.concur_url is not None:
            try:
                r = await self._client.get(f"{self.concur_url}/concur/status")
                r.raise_for_status()
                status = r.json()
            except (httpx.HTTPError, ValueError):
                self.errors += 1
        self.samples.append(
            Sample(
                t=round(t, 3),
                kv_usage=sig.kv_usage,
                hit_rate=self._hit_rate(sig),
                running=sig.running,
                waiting=sig.waiting,
                preemptions_total=sig.preemptions_total,
                window=status.get("window"),
                active=status.get("active"),
                live=status.get("live"),
                paused=status.get("paused"),
                queued=status.get("queued"),
                pressure=status.get("pressure"),
                decision=status.get("decision"),
            )
        )
        self._prev = sig

    def _hit_rate(self, sig: EngineSignal) -> float | None:
        prev = self._prev
        if (
            prev is None
            or sig.prefix_hits_total is None
            or sig.prefix_queries_total is None
            or prev.prefix_hits_total is None
            or prev.prefix_queries_total is None
        ):
            return None
        queries = sig.prefix_queries_total - prev.prefix_queries_total
        if queries <= 0:
            return None
        return round((sig.prefix_hits_total - prev.prefix_hits_total) / queries, 4)
