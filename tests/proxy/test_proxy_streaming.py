"""Streaming relay: chunks as they arrive, exact endings, disconnects, usage chunk stripping."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, chat, sse_events, sse_json, wait_for


async def test_chunks_arrive_before_upstream_finishes(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    headers = {AGENT: "s1", "X-Test-Id": "slow", "X-Fake-Delay": "0.4", "X-Fake-Tokens": "4"}
    headers.update(DONE)
    t0 = time.monotonic()
    async with c.client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        it = resp.aiter_raw()
        first = await it.__anext__()
        first_at = time.monotonic() - t0
        assert first.startswith(b"data: ")
        # The upstream is still sleeping between tokens: it has not finished.
        assert not fake.by_id("slow").finished
        assert first_at < 0.35
        rest = b"".join([chunk async for chunk in it])
    body = (first + rest).decode()
    assert fake.by_id("slow").finished
    assert body.endswith("data: [DONE]\n\n")
    assert time.monotonic() - t0 >= 1.1


async def test_stream_ends_exactly_as_upstream(start_concur: Start, fake: FakeVLLM) -> None:
    """The relayed bytes equal the upstream's when nothing is injected."""
    c = await start_concur()
    body = chat(stream=True, stream_options={"include_usage": True})
    r = await c.client.post("/v1/chat/completions", json=body, headers={AGENT: "x", **DONE})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert r.text.endswith("}\n\ndata: [DONE]\n\n")
    chunks = sse_json(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks[:-1]) == (
        "tok0 tok1 tok2 "
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_injected_usage_chunk_is_stripped(
    start_concur: Start, fake: FakeVLLM, path: str
) -> None:
    c = await start_concur()
    body = (
        chat("x" * 400, stream=True)
        if "chat" in path
        else {"model": "m", "prompt": "x" * 400, "stream": True}
    )
    r = await c.client.post(path, json=body, headers={AGENT: "u1", "X-Test-Id": "inj"})
    assert r.status_code == 200
    # The engine was asked for usage...
    sent = fake.by_id("inj").json
    assert sent["stream_options"] == {"include_usage": True}
    # ...but the client, who did not ask, never sees the usage-only chunk.
    chunks = sse_json(r.text)
    assert chunks
    assert all(ch["choices"] for ch in chunks)
    assert all("usage" not in ch for ch in chunks)
    assert sse_events(r.text)[-1] == "[DONE]"
    # The usage still reached the gate: the agent's context is prompt + completion.
    agent = c.runtime.gate.get("u1")
    assert agent is not None
    prompt = len(json.dumps(body.get("messages") or body.get("prompt"))) // 4
    assert agent.context_tokens == prompt + 3
    r = await c.client.post(path, json={**body, "stream": False}, headers={AGENT: "u1", **DONE})
    assert r.status_code == 200


async def test_usage_chunk_kept_when_client_asked(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    body = chat(stream=True, stream_options={"include_usage": True})
    r = await c.client.post(
        "/v1/chat/completions", json=body, headers={AGENT: "u2", "X-Test-Id": "asked", **DONE}
    )
    chunks = sse_json(r.text)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    # Forwarded as sent (no re-serialisation needed).
    assert fake.by_id("asked").json["stream_options"] == {"include_usage": True}


async def test_explicit_false_include_usage_is_respected(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur()
    body = chat(stream=True, stream_options={"include_usage": False})
    r = await c.client.post("/v1/chat/completions", json=body, headers={AGENT: "u3", **DONE})
    assert all(ch["choices"] for ch in sse_json(r.text))


async def test_bypassed_requests_are_not_rewritten(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"admission.anonymous": "bypass"})
    raw = b'{"model": "m", "messages": [], "stream": true}'
    r = await c.client.post(
        "/v1/chat/completions",
        content=raw,
        headers={"Content-Type": "application/json", "X-Test-Id": "byp"},
    )
    assert r.status_code == 200
    assert fake.by_id("byp").body == raw


async def test_client_disconnect_cancels_upstream_and_frees_permit(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"policy.name": "static:1"})
    headers = {AGENT: "gone", "X-Test-Id": "dc", "X-Fake-Delay": "1.0", "X-Fake-Tokens": "20"}
    client = httpx.AsyncClient(base_url=c.url, timeout=10, trust_env=False)
    async with client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as resp:
        await resp.aiter_raw().__anext__()
        agent = c.runtime.gate.get("gone")
        assert agent is not None and agent.in_flight == 1
    await client.aclose()  # drop the connection mid-stream
    t0 = time.monotonic()
    await wait_for(lambda: "dc" in fake.cancelled, within=2.0, what="upstream cancellation")
    assert time.monotonic() - t0 < 0.5
    await wait_for(lambda: agent.in_flight == 0, within=1.0, what="the permit released")
    assert agent.requests == 1
    # The slot is still the agent's (it did not say it was done); its next step runs.
    r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "gone", **DONE})
    assert r.status_code == 200


async def test_disconnect_while_waiting_for_headers(start_concur: Start, fake: FakeVLLM) -> None:
    """A non-streaming request: the client gives up before the engine answers."""
    c = await start_concur()
    headers = {AGENT: "nd", "X-Test-Id": "nd", "X-Fake-Header-Delay": "3", **DONE}
    with pytest.raises(httpx.ReadTimeout):
        await c.client.post("/v1/chat/completions", json=chat(), headers=headers, timeout=0.3)
    await wait_for(lambda: "nd" in fake.cancelled, within=2.0, what="upstream cancellation")
    # The done request's permit finished: the agent ended with it.
    await wait_for(lambda: c.runtime.gate.get("nd") is None, within=1.0, what="agent ended")


async def test_queued_client_disconnect_leaves_no_trace(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"policy.name": "static:1"})
    r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "a"})
    assert r.status_code == 200
    task = asyncio.create_task(
        c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "b"}, timeout=0.3)
    )
    await wait_for(lambda: c.runtime.gate.queued == 1, what="b queued")
    with pytest.raises(httpx.ReadTimeout):
        await task
    await wait_for(lambda: c.runtime.gate.queued == 0, what="b gone from the queue")
    r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "a", **DONE})
    assert r.status_code == 200
