"""The real ``openai`` client through ``concur serve`` to ``concur engine``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import pytest
from fakes.harness import AGENT, DONE, FAST, wait_for
from openai import AsyncOpenAI

from concur.app import RUNTIME, Server, build_app
from concur.config import load_settings
from concur.sim.server.tokenizer import filler_text

if TYPE_CHECKING:
    from conftest import Engine, StartEngine

BS = 16


@pytest.fixture
async def through_proxy(start_engine: StartEngine) -> AsyncIterator[tuple[Engine, Server]]:
    engine = await start_engine(kv_tokens=30_000, speed=100.0)
    settings = load_settings(
        overrides={**FAST, "upstream.url": engine.url, "engine.kind": "vllm"}, env={}
    )
    server = Server(build_app(settings), "127.0.0.1", 0, drain_timeout=5.0)
    await server.start()
    try:
        yield engine, server
    finally:
        await server.stop()


async def test_openai_client_through_the_proxy(through_proxy: tuple[Engine, Server]) -> None:
    engine, proxy = through_proxy
    runtime = proxy.app[RUNTIME]
    await wait_for(lambda: runtime.poller.signal is not None, what="a first engine signal")
    signal = runtime.poller.signal
    assert signal is not None and signal.kv_capacity_tokens == 30_000 and signal.engines == 1

    async with AsyncOpenAI(
        base_url=proxy.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False),
    ) as client:
        messages = [
            {"role": "system", "content": filler_text(300, seed="proxy")},
            {"role": "user", "content": filler_text(20, seed="proxy-q")},
        ]
        first = await client.chat.completions.create(
            model=engine.model, messages=messages, max_tokens=10, extra_headers={AGENT: "a1"}
        )
        assert first.usage is not None
        p1 = first.usage.prompt_tokens
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "and then?"},
        ]
        stream = await client.chat.completions.create(
            model=engine.model,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={AGENT: "a1", **DONE},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            else:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 6
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == (p1 + 10 - 1) // BS * BS
    gate = runtime.gate
    await wait_for(lambda: gate.active == 0 and gate.queued == 0, what="an empty gate")
