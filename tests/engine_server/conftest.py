"""Fixtures for the ``concur engine`` tests: real simulated engines on loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from concur.adapters.signal import EngineSignal
from concur.adapters.vllm import parse
from concur.sim.engine_config import EngineSpec
from concur.sim.server.app import EngineServer, EngineServerConfig, EngineState


@dataclass
class Engine:
    """One running simulated engine with an httpx and an openai client for it."""

    server: EngineServer
    http: httpx.AsyncClient
    openai: AsyncOpenAI
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def state(self) -> EngineState:
        return self.server.state

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def model(self) -> str:
        return self.state.model_name

    async def signal(self) -> EngineSignal:
        resp = await self.http.get("/metrics")
        assert resp.status_code == 200, resp.text
        return parse(resp.text, 0.0)

    async def stats(self) -> dict[str, Any]:
        resp = await self.http.get("/sim/stats")
        assert resp.status_code == 200
        data: dict[str, Any] = resp.json()
        return data


StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    """``await start_engine(kv_tokens=..., speed=..., **config)``: a llama-3-8b engine on
    one H100 (fast steps) unless ``spec`` says otherwise."""
    started: list[Engine] = []

    async def start(
        *,
        kv_tokens: int = 50_000,
        speed: float = 100.0,
        spec: EngineSpec | None = None,
        **config: Any,
    ) -> Engine:
        spec = spec or EngineSpec(model="llama-3-8b", tp=1, kv_capacity_tokens=kv_tokens)
        server = EngineServer(EngineServerConfig(spec=spec, speed=speed, **config), port=0)
        await server.start()
        http = httpx.AsyncClient(base_url=server.url, timeout=30.0, trust_env=False)
        client = AsyncOpenAI(
            base_url=server.url + "/v1",
            api_key="unused",
            max_retries=0,
            timeout=30.0,
            http_client=httpx.AsyncClient(trust_env=False),
        )
        engine = Engine(server, http, client)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.openai.close()
        await engine.http.aclose()
        await engine.server.stop()


@pytest.fixture
async def engine(start_engine: StartEngine) -> Engine:
    return await start_engine()
