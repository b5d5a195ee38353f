"""The real ``openai`` client, streaming and not, through ``concur serve`` to ``concur engine``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fakes.harness import wait_for
from openai import AsyncOpenAI

from concur.sim.server.prompt import chat_overhead
from concur.sim.server.tokenizer import filler_text
from concur.sim.swarm.client import AGENT_HEADER, DONE_HEADER

if TYPE_CHECKING:
    from conftest import StartStack

BLOCK = 16


async def _step(
    client: AsyncOpenAI, messages: list[dict[str, str]], headers: dict[str, str], *, stream: bool
) -> tuple[str, Any]:
    """One chat request; returns the reply text and its usage."""
    common: dict[str, Any] = {
        "model": "concur-sim/llama-3-8b",
        "messages": messages,
        "max_tokens": 12,
        "extra_headers": headers,
        "extra_body": {"ignore_eos": True, "min_tokens": 12},
    }
    if not stream:
        resp = await client.chat.completions.create(**common)
        return resp.choices[0].message.content or "", resp.usage
    chunks = await client.chat.completions.create(
        **common, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
async def test_openai_agent_through_concur_to_the_engine(
    start_stack: StartStack, stream: bool
) -> None:
    stack = await start_stack(policy="aimd", kv_tokens=40_000, speed=50.0)
    agent = f"agent-{stream}"
    messages = [
        {"role": "system", "content": filler_text(400, "e2e-system")},
        {"role": "user", "content": filler_text(100, f"e2e-{stream}-0")},
    ]
    async with AsyncOpenAI(
        base_url=f"{stack.proxy.url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False),
    ) as client:
        prompt_before = 0
        for step in range(3):
            headers = {AGENT_HEADER: agent}
            if step == 2:
                headers[DONE_HEADER] = "1"
            text, usage = await _step(client, messages, headers, stream=stream)
            assert usage is not None
            assert usage.completion_tokens == 12
            assert len(text.split()) == 12
            content = sum(len(m["content"].split()) for m in messages)
            assert usage.prompt_tokens == content + chat_overhead(len(messages))
            cached = usage.prompt_tokens_details.cached_tokens
            if step == 0:
                assert cached == 0
            else:
                # The whole previous context (prompt + reply) was re-sent and still cached.
                assert cached == (prompt_before + 12 - 1) // BLOCK * BLOCK
            prompt_before = usage.prompt_tokens
            if step < 2:
                status = await stack.status()
                assert status["active"] == 1 and status["queued"] == 0
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": filler_text(50, f"e2e-{stream}-{step + 1}")},
            ]
    gate = stack.runtime.gate
    await wait_for(lambda: gate.active == 0, what="the agent's slot freed by its done header")
    status = await stack.status()
    assert status["active"] == 0 and status["queued"] == 0 and status["in_flight"] == 0
