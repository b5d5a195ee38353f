"""The real ``openai`` client through the proxy, streaming and not."""

from __future__ import annotations

import openai
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import DONE, Concur, Start
from openai import AsyncOpenAI

MESSAGES = [{"role": "user", "content": "write a haiku"}]


def client_for(c: Concur, agent: str) -> AsyncOpenAI:
    client = AsyncOpenAI(
        base_url=c.url + "/v1",
        api_key="x",
        default_headers={"X-Concur-Agent-Id": agent},
        max_retries=0,
        timeout=10,
    )
    return client


async def test_chat_non_streaming(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    async with client_for(c, "oa1") as client:
        out = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert out.choices[0].message.content == "tok0 tok1 tok2 "
        assert out.usage is not None and out.usage.completion_tokens == 3
        agent = c.runtime.gate.get("oa1")
        assert agent is not None
        assert agent.context_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]
        done = await client.completions.create(
            model="m", prompt="hello", max_tokens=3, extra_headers=DONE
        )
        assert done.choices[0].text == "tok0 tok1 tok2 "
    assert c.runtime.gate.get("oa1") is None
    # The client's API key reached the engine untouched.
    assert ("Authorization", "Bearer x") in fake.seen[0].headers


async def test_chat_streaming_without_usage_sees_no_usage_chunk(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur()
    async with client_for(c, "oa2") as client:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"X-Test-Id": "s1"}
        )
        chunks = [chunk async for chunk in stream]
        assert fake.by_id("s1").json["stream_options"] == {"include_usage": True}
        assert chunks and all(ch.choices for ch in chunks)
        assert all(ch.usage is None for ch in chunks)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert text == "tok0 tok1 tok2 "
        assert chunks[-1].choices[0].finish_reason == "stop"
        # concur still learned the usage.
        agent = c.runtime.gate.get("oa2")
        assert agent is not None and agent.context_tokens > 3
        # Completions API, streaming, last step.
        stream2 = await client.completions.create(
            model="m", prompt="p", stream=True, extra_headers=DONE
        )
        parts = [ch async for ch in stream2]
        assert all(ch.choices for ch in parts) and all(ch.usage is None for ch in parts)


async def test_chat_streaming_with_usage_keeps_usage_chunk(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur()
    async with client_for(c, "oa3") as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=DONE,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_rate_limit_surfaces_as_openai_error(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:1", "admission.max_queue_len": 0})
    async with client_for(c, "holder") as holder, client_for(c, "late") as late:
        await holder.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as info:
            await late.chat.completions.create(model="m", messages=MESSAGES)
        assert "queue is full" in info.value.message
        assert info.value.code == "queue_full"
        await holder.chat.completions.create(model="m", messages=MESSAGES, extra_headers=DONE)
