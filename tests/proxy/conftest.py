"""Fixtures for the proxy tests: a fake vLLM and concur, both real servers on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import FAST, Concur, Start, wait_for

from concur.app import Server, build_app
from concur.config import load_settings


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM() as f:
        yield f


@pytest.fixture
async def start_concur(fake: FakeVLLM) -> AsyncIterator[Start]:
    """``await start_concur(**{"dotted.key": value})``: concur in front of ``fake``.

    At teardown every scenario must have left the gate empty: active == 0, queued == 0.
    """
    started: list[Concur] = []

    async def start(upstream: str | None = None, **overrides: Any) -> Concur:
        values = {**FAST, "upstream.url": upstream or fake.url, **overrides}
        settings = load_settings(overrides=values, env={})
        app = build_app(settings)
        server = Server(app, "127.0.0.1", 0, drain_timeout=settings.server.drain_timeout)
        await server.start()
        client = httpx.AsyncClient(base_url=server.url, timeout=10.0, trust_env=False)
        c = Concur(server=server, settings=settings, client=client)
        started.append(c)
        return c

    yield start
    for c in started:
        try:
            if c.check_empty and not c.stopped:
                gate = c.runtime.gate
                await wait_for(
                    lambda g=gate: g.active == 0 and g.queued == 0,
                    within=3.0,
                    what="an empty gate at the end of the scenario",
                )
        finally:
            await c.client.aclose()
            for extra in c.extra_clients:
                await extra.aclose()
            await c.stop()
