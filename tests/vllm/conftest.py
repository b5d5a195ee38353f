"""A real vLLM server (the CPU build, the tiny model made here) for the tests marked ``vllm``.

One server for the whole session (start-up takes 35-90 s): a small KV cache of
:data:`KV_BLOCKS` blocks of 128 tokens, so that a handful of agents overflows
it. ``concur serve`` runs in the test's event loop in front of it (a real
aiohttp server on a loopback port).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from concur.app import Server, build_app
from concur.config import load_settings
from concur.sim.realvllm import VllmServer, VllmServerConfig, make_model

KV_BLOCKS = 64
"""8,192 tokens of cache; max model length 8,064."""


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    model = make_model()
    log = Path(tmp_path_factory.mktemp("vllm")) / "vllm.log"
    server = VllmServer(VllmServerConfig(model=model, kv_blocks=KV_BLOCKS), log_path=log)
    with server:
        yield server


StartConcur = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_concur(vllm_server: VllmServer) -> AsyncIterator[StartConcur]:
    """``await start_concur(**settings)``: concur in front of the session's vLLM."""
    started: list[Server] = []

    async def start(**overrides: Any) -> Server:
        values = {"upstream.url": vllm_server.url, "server.port": 9000, **overrides}
        proxy = Server(build_app(load_settings(overrides=values, env={})), "127.0.0.1", 0)
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()
