"""One live run: a swarm against a base URL while a :class:`Monitor` watches the engine.

Shared by ``concur demo``, the end-to-end tests and ``bench/consistency.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from concur.sim.demo.monitor import Monitor, engine_counters
from concur.sim.demo.report import RunRecord, ideal_prefill_tokens
from concur.sim.swarm.client import ProgressFn, SwarmOptions, run_swarm
from concur.sim.trace import Trace

__all__ = ["fetch_json", "run_live", "settled_status"]


async def fetch_json(url: str) -> dict[str, Any]:
    """``GET url`` as JSON (raises on HTTP errors)."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        resp = await client.get(url)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data


async def settled_status(concur_url: str, *, within: float = 5.0) -> dict[str, Any]:
    """concur's ``/concur/status`` once no agent is active or queued (or after ``within`` s).

    The last agent's slot is freed when its final response has been relayed,
    a moment after the client read it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        status = await fetch_json(f"{concur_url}/concur/status")
        if (status.get("active"), status.get("queued")) == (0, 0) or loop.time() > deadline:
            return status
        await asyncio.sleep(0.05)


async def run_live(
    label: str,
    trace: Trace,
    *,
    engine_url: str,
    concur_url: str | None = None,
    speed: float,
    sample_interval: float = 0.5,
    progress: ProgressFn | None = None,
    model: str | None = None,
    simulated: bool = True,
) -> RunRecord:
    """Run ``trace`` through concur (when ``concur_url`` is given) or straight at the engine.

    Polls the engine's ``/metrics`` (and concur's ``/concur/status``) every
    ``sample_interval`` wall seconds, counts what the engine's counters grew by over
    the run (an engine kept running between runs counts on), and reads concur's final
    status at the end. ``simulated``: the engine runs on a simulated clock (``concur
    engine``), not a real one (vLLM).
    """
    base = concur_url if concur_url is not None else engine_url
    monitor = Monitor(engine_url, concur_url=concur_url, speed=speed, interval=sample_interval)
    before = await _counters(engine_url)
    await monitor.start()
    try:
        options = SwarmOptions(base_url=base, speed=speed, model=model)
        result = await run_swarm(trace, options, progress=progress)
    finally:
        await monitor.stop()
    after = await _counters(engine_url)
    counters = {k: v - before.get(k, 0.0) for k, v in after.items()}
    status = await settled_status(concur_url) if concur_url else None
    return RunRecord(
        label=label,
        swarm=result.summary.to_dict(),
        engine=counters,
        samples=monitor.samples,
        ideal_prefill_tokens=ideal_prefill_tokens(trace),
        proxy_status=status,
        agents=[a.to_dict() for a in result.agents],
        simulated=simulated,
    )


async def _counters(engine_url: str) -> dict[str, float]:
    """The engine's counters now."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        resp = await client.get(f"{engine_url.rstrip('/')}/metrics")
        resp.raise_for_status()
        return engine_counters(resp.text)
