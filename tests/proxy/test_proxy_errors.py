"""Upstream failures and bad requests: quick OpenAI-shaped errors, never a hang."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, assert_openai_error, chat, wait_for

from concur.identity import DEFAULT_SOURCES as DEFAULT_IDENTITY

IDENTITY = list(DEFAULT_IDENTITY)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_upstream_down_gives_502_quickly(start_concur: Start) -> None:
    c = await start_concur(upstream=f"http://127.0.0.1:{_closed_port()}")
    for method, path, kwargs in (
        ("POST", "/v1/chat/completions", {"json": chat(), "headers": {AGENT: "d", **DONE}}),
        ("POST", "/v1/chat/completions", {"json": chat(stream=True)}),
        ("GET", "/v1/models", {}),
    ):
        t0 = time.monotonic()
        resp = await c.client.request(method, path, **kwargs)
        assert time.monotonic() - t0 < 1.0
        err = assert_openai_error(resp, 502)
        assert err["code"] == "upstream_unavailable"
        assert "Traceback" not in resp.text
    status = await c.status()
    assert status["stale"] is True
    assert status["signal"] is None
    r = await c.client.get("/readyz")
    assert r.status_code == 503
    reasons = " ".join(r.json()["reasons"])
    assert "no engine signal" in reasons and "unreachable" in reasons


async def test_slow_upstream_gives_504(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"upstream.first_byte_timeout": 0.3})
    headers = {AGENT: "t", "X-Fake-Header-Delay": "3", "X-Test-Id": "slow", **DONE}
    t0 = time.monotonic()
    resp = await c.client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert time.monotonic() - t0 < 1.5
    err = assert_openai_error(resp, 504)
    assert err["code"] == "upstream_timeout"
    assert "first_byte_timeout" in err["message"]
    # The abandoned upstream request is cancelled, not left running.
    await wait_for(lambda: "slow" in fake.cancelled, within=2.0, what="upstream cancelled")


async def test_upstream_dies_mid_stream(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    headers = {AGENT: "m", "X-Fake-Die-After": "2", "X-Fake-Tokens": "5", **DONE}
    with pytest.raises(httpx.RemoteProtocolError):
        await c.client.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    # The permit was released despite the failure (the scenario's teardown checks too).
    await wait_for(lambda: c.runtime.gate.active == 0, what="gate empty")


async def test_upstream_silence_mid_stream_hits_read_timeout(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"upstream.read_timeout": 0.3})
    headers = {AGENT: "r", "X-Fake-Delay": "2", "X-Fake-Tokens": "3", "X-Test-Id": "rt", **DONE}
    t0 = time.monotonic()
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with c.client.stream(
            "POST", "/v1/chat/completions", json=chat(stream=True), headers=headers
        ) as resp:
            async for chunk in resp.aiter_raw():
                got += chunk
    assert time.monotonic() - t0 < 1.5
    assert got.startswith(b"data: ") and b"[DONE]" not in got
    await wait_for(lambda: "rt" in fake.cancelled, within=2.0, what="upstream cancelled")


async def test_identity_validation(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(
        **{"admission.max_identity_bytes": 16, "admission.identity": [*IDENTITY, "body:user"]}
    )
    err = assert_openai_error(
        await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "x" * 17}), 400
    )
    assert err["code"] == "invalid_agent_identity"
    assert "header:X-Concur-Agent-Id" in err["message"] and "16" in err["message"]
    err = assert_openai_error(
        await c.client.post("/v1/chat/completions", json=chat(user="bad\x07id")), 400
    )
    assert "body:user" in err["message"] and "control" in err["message"]
    # Nothing reached the engine, nothing is left in the gate.
    assert fake.seen == []


async def test_identity_sources_in_order(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"admission.identity": [*IDENTITY, "body:user"]})
    gate = c.runtime.gate
    await c.client.post(
        "/v1/chat/completions",
        json=chat(user="from-user", session_id="from-body"),
        headers={"X-Session-Id": "from-header"},
    )
    await c.client.post("/v1/chat/completions", json=chat(user="u-only"))
    await c.client.post("/v1/completions", json={"model": "m", "prompt": "p", "session_id": "sess"})
    assert [a.agent_id for a in gate.agents()] == ["from-header", "u-only", "sess"]
    for agent in ("from-header", "u-only", "sess"):
        r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: agent, **DONE})
        assert r.status_code == 200


async def test_non_json_body_is_forwarded_untouched(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    r = await c.client.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json", AGENT: "nj", "X-Test-Id": "nj", **DONE},
    )
    assert r.status_code == 200  # the fake is lenient; vLLM would answer 400
    assert fake.by_id("nj").body == b"{not json"
