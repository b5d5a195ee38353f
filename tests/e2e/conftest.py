"""Fixtures for the end-to-end tests: ``concur engine`` and ``concur serve`` in-process.

Both are real servers on loopback ports (port 0), started with their app
factories in the test's event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fakes.harness import wait_for

from concur.app import RUNTIME, Server, build_app
from concur.config import load_settings
from concur.control import TickRecord
from concur.runtime import Runtime
from concur.sim.demo.scenario import live_settings
from concur.sim.engine_config import EngineSpec
from concur.sim.server.app import EngineServer, EngineServerConfig


@dataclass
class Stack:
    """A simulated engine, concur in front of it, and every control tick concur made."""

    engine: EngineServer
    proxy: Server
    speed: float
    ticks: list[TickRecord] = field(default_factory=list)

    @property
    def runtime(self) -> Runtime:
        return self.proxy.app[RUNTIME]

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False) as client:
            resp = await client.get(f"{self.proxy.url}/concur/status")
            assert resp.status_code == 200, resp.text
            data: dict[str, Any] = resp.json()
            return data


StartStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def start_stack() -> AsyncIterator[StartStack]:
    """``await start_stack(policy="aimd", kv_tokens=..., speed=...)``.

    concur's control loop runs on the engine's simulated time (control interval
    1 simulated second, see :func:`live_settings`). Every tick is recorded in
    ``Stack.ticks``.
    """
    started: list[Stack] = []

    async def start(
        *,
        policy: str = "aimd",
        kv_tokens: int = 40_000,
        speed: float = 20.0,
        model: str = "llama-3-8b",
        **overrides: Any,
    ) -> Stack:
        spec = EngineSpec(model=model, gpu="h100", tp=1, kv_capacity_tokens=kv_tokens)
        engine = EngineServer(EngineServerConfig(spec=spec, speed=speed), port=0)
        await engine.start()
        values = {
            **live_settings(speed),
            "upstream.url": engine.url,
            "policy.name": policy,
            "server.port": 9000,
            **overrides,
        }
        settings = load_settings(overrides=values, env={})
        proxy = Server(build_app(settings), "127.0.0.1", 0, drain_timeout=5.0)
        await proxy.start()
        stack = Stack(engine, proxy, speed)
        runtime = stack.runtime
        original = runtime.controller.on_tick

        def record(rec: TickRecord) -> None:
            stack.ticks.append(rec)
            if original is not None:
                original(rec)

        runtime.controller.on_tick = record
        started.append(stack)
        await wait_for(
            lambda: runtime.poller.signal is not None, within=5.0, what="a first engine signal"
        )
        return stack

    yield start
    for stack in started:
        await stack.proxy.stop()
        await stack.engine.stop()
