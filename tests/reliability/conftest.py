"""Fixtures for the fault matrix: a fault-injecting fake vLLM, concur in front of it, a ledger.

Every concur started here is checked at teardown for an empty gate (active == 0,
queued == 0), like the proxy tests; the invariants proper are asserted by each
test through :func:`fakes.invariants.assert_invariants`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import FAST, Concur, Start, wait_for
from fakes.invariants import Ledger

from concur.app import Server, build_app
from concur.config import load_settings

# Failing polls back off (poll_interval x 2^n): short intervals keep recovery quick;
# stale_after leaves room for a slow poll on a busy machine.
RELIABILITY = {
    **FAST,
    "engine.poll_interval": 0.02,
    "engine.poll_timeout": 0.3,
    "engine.stale_after": 0.4,
    "control.interval": 0.02,
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM(strict_json=True) as f:
        yield f


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def start_concur(fake: FakeVLLM) -> AsyncIterator[Start]:
    """``await start_concur(**{"dotted.key": value})``: concur in front of ``fake``."""
    started: list[Concur] = []

    async def start(upstream: str | None = None, **overrides: Any) -> Concur:
        values = {**RELIABILITY, "upstream.url": upstream or fake.url, **overrides}
        settings = load_settings(overrides=values, env={})
        app = build_app(settings)
        server = Server(app, "127.0.0.1", 0, drain_timeout=settings.server.drain_timeout)
        await server.start()
        # verify=False: loopback http only, and it skips loading a CA bundle (~0.1 s a client)
        client = httpx.AsyncClient(base_url=server.url, timeout=10.0, trust_env=False, verify=False)
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
