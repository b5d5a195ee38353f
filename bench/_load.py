"""The benchmark's load: N streaming chat clients in one process, and what they measured.

Every path is driven by the same client (aiohttp by default, httpx on request),
each worker with its own agent id, sending one streaming chat completion after
another. Time to first byte is measured to the first body bytes; a stream counts
when it ends in ``data: [DONE]`` with status 200.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
from dataclasses import dataclass

import aiohttp
import httpx
from _proc import Proc

CHAT_PATH = "/v1/chat/completions"
AGENT_HEADER = "X-Concur-Agent-Id"
REQUEST_BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a coding agent. " * 20},
            {"role": "user", "content": "Fix the failing test in tests/test_parser.py. " * 10},
        ],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
).encode()
API_KEY = "sk-" + secrets.token_hex(32)
"""Sent by every client on every path (LiteLLM's proxy will not start without a master key)."""
JSON_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
STOP_WAIT = 5.0
"""Seconds the streams in flight at the end of a case may take to finish before cancelling."""


class LoadClient:
    """The HTTP client all workers share: aiohttp or httpx, pooled, no connection limit."""

    def __init__(self, kind: str, connections: int) -> None:
        if kind not in ("aiohttp", "httpx"):
            raise ValueError(f"client {kind!r}: use aiohttp or httpx")
        self.kind = kind
        self._aio: aiohttp.ClientSession | None = None
        self._hx: httpx.AsyncClient | None = None
        if kind == "aiohttp":
            self._aio = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=120),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        else:
            n = connections + 8
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            self._hx = httpx.AsyncClient(limits=limits, timeout=120, trust_env=False)

    async def close(self) -> None:
        if self._aio is not None:
            await self._aio.close()
        if self._hx is not None:
            await self._hx.aclose()

    async def stream(self, url: str, headers: dict[str, str]) -> tuple[float, bool]:
        """One streaming request: (seconds to the first body bytes, ended well in [DONE])."""
        t0 = time.perf_counter()
        ttfb = math.nan
        tail = b""
        if self._aio is not None:
            async with self._aio.post(url, data=REQUEST_BODY, headers=headers) as resp:
                first = await resp.content.readany()
                ttfb = time.perf_counter() - t0
                tail = first[-16:]
                while chunk := await resp.content.readany():
                    tail = (tail + chunk)[-16:]
                status = resp.status
        else:
            assert self._hx is not None
            async with self._hx.stream("POST", url, content=REQUEST_BODY, headers=headers) as r:
                async for chunk in r.aiter_raw():
                    if math.isnan(ttfb):
                        ttfb = time.perf_counter() - t0
                    tail = (tail + chunk)[-16:]
                status = r.status_code
        return ttfb, status == 200 and tail.endswith(b"data: [DONE]\n\n")


@dataclass(slots=True)
class Record:
    """One stream as the client saw it (perf_counter seconds)."""

    start: float
    ttfb: float
    end: float
    ok: bool


@dataclass
class Sample:
    """One case (a path at a client count), measured once over its window."""

    target: str
    clients: int
    window: float
    ttfbs: list[float]
    completed: int
    errors: int
    proxy_cpu: float | None
    """CPU seconds of the proxy process in the window (None: the direct path)."""
    proxy_rss: float | None
    """The proxy's resident set at the end of the window, MiB."""
    upstream_cpu: float
    client_cpu: float

    @property
    def rate(self) -> float:
        """Completed streams per second."""
        return self.completed / self.window

    def pct(self, q: float) -> float:
        """Time to first byte at quantile ``q``, in ms."""
        if not self.ttfbs:
            return math.nan
        xs = sorted(self.ttfbs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0

    def cpu_per_stream_ms(self) -> float | None:
        if self.proxy_cpu is None:
            return None
        return 1000.0 * self.proxy_cpu / max(1, self.completed)


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run_case(
    name: str,
    url: str,
    proxy: Proc | None,
    upstream: Proc,
    clients: int,
    *,
    warmup: float,
    duration: float,
    client_kind: str,
    agents: str = "agent",
) -> Sample:
    """``clients`` workers stream back to back for ``warmup + duration`` s; measure the window.

    Worker ``i`` is agent ``<agents>-<i>`` in every case, so a run has at most as many
    agents as its largest client count: they are admitted once and keep their slots
    (they never say they are done), as long-running agents do.

    Streams that end inside the window count towards the rate; streams that start
    inside it give the time-to-first-byte sample. CPU is read from /proc at the
    window's edges, RSS at its end.
    """
    load = LoadClient(client_kind, clients)
    target = url + CHAT_PATH
    records: list[Record] = []
    stop = False

    async def worker(i: int) -> None:
        headers = {**JSON_HEADERS, AGENT_HEADER: f"{agents}-{i}"}
        while not stop:
            t0 = time.perf_counter()
            try:
                ttfb, ok = await load.stream(target, headers)
            except (aiohttp.ClientError, httpx.HTTPError, TimeoutError):
                ttfb, ok = math.nan, False
            records.append(Record(t0, ttfb, time.perf_counter(), ok))
            if not ok:
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
    try:
        await asyncio.sleep(warmup)
        cpu0 = proxy.cpu() if proxy else 0.0
        up0, me0 = upstream.cpu(), _self_cpu()
        w0 = time.perf_counter()
        if proxy:
            proxy.profile(True)
        await asyncio.sleep(duration)
        if proxy:
            proxy.profile(False)
        w1 = time.perf_counter()
        cpu1 = proxy.cpu() if proxy else 0.0
        up1, me1 = upstream.cpu(), _self_cpu()
        rss = proxy.rss_mib() if proxy else None
        stop = True
        await asyncio.wait(tasks, timeout=STOP_WAIT)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await load.close()
    done = [r for r in records if w0 <= r.end <= w1]
    started = [r for r in records if w0 <= r.start <= w1 and r.ok]
    return Sample(
        target=name,
        clients=clients,
        window=w1 - w0,
        ttfbs=[r.ttfb for r in started],
        completed=sum(r.ok for r in done),
        errors=sum(not r.ok for r in done),
        proxy_cpu=(cpu1 - cpu0) if proxy else None,
        proxy_rss=rss,
        upstream_cpu=up1 - up0,
        client_cpu=me1 - me0,
    )
