"""Overload protection on the request path: the byte budget of the agent steps' bodies
(``server.max_held_bytes``), against real loopback servers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Concur, Start, assert_openai_error, chat, wait_for

from concur.config import ConfigError, load_settings

BODY = 20_000
"""Bytes of each request body (about: the JSON around the content adds a few dozen)."""
BUDGET = {
    "policy.name": "static:1",
    "server.max_body_bytes": 64 << 10,
    "server.max_held_bytes": 70_000,  # three bodies fit, a fourth does not
}


def _body(agent: str) -> bytes:
    return json.dumps(chat("x" * BODY, user=agent)).encode()


async def _step(c: Concur, agent: str, *, done: bool = False, **kw: Any) -> httpx.Response:
    headers = {AGENT: agent, "Content-Type": "application/json", **(DONE if done else {})}
    return await c.client.post("/v1/chat/completions", content=_body(agent), headers=headers, **kw)


def _later(c: Concur, agent: str, *, done: bool = False) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(_step(c, agent, done=done))


async def test_new_agents_past_the_budget_get_503_at_once(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**BUDGET)
    gate, budget = c.runtime.gate, c.runtime.proxy.budget
    assert budget.limit == 70_000
    assert (await _step(c, "a")).status_code == 200  # the window is full
    waiting = [_later(c, f"q{i}", done=True) for i in range(3)]
    await wait_for(lambda: gate.queued == 3, what="three queued")
    assert budget.held == 3 * len(_body("q0"))
    # A fourth new agent does not fit: refused at once, not queued.
    resp = await _step(c, "late")
    err = assert_openai_error(resp, 503)
    assert err["code"] == "overloaded" and err["type"] == "server_error"
    assert "server.max_held_bytes" in err["message"]
    assert resp.headers["retry-after"] == "5"
    assert gate.queued == 3 and gate.get("late") is None
    # A queued agent's second request is a new agent's too: refused.
    assert assert_openai_error(await _step(c, "q0"), 503)["code"] == "overloaded"
    # The admitted agent's steps still run, whatever the budget (counted while they do).
    assert (await _step(c, "a")).status_code == 200
    assert budget.peak == 3 * len(_body("q0")) + len(_body("a"))
    metrics = (await c.client.get("/metrics")).text
    assert 'concur_admissions_total{outcome="overloaded"} 2.0' in metrics
    # Its last step frees the slot: the queue drains and the budget empties.
    assert (await _step(c, "a", done=True)).status_code == 200
    assert [r.status_code for r in await asyncio.wait_for(asyncio.gather(*waiting), 5)] == [200] * 3
    assert budget.held == 0 and budget.refused == 2


async def test_every_way_out_of_the_queue_gives_its_bytes_back(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{**BUDGET, "admission.max_queue_wait": 0.5})
    gate, budget = c.runtime.gate, c.runtime.proxy.budget
    assert (await _step(c, "a")).status_code == 200
    # A client that hangs up while queued.
    gone = _later(c, "gone")
    await wait_for(lambda: gate.queued == 1, what="queued")
    assert budget.held > 0
    gone.cancel()
    await wait_for(lambda: budget.held == 0 and gate.queued == 0, what="bytes given back")
    # Queue timeouts (429).
    timed = [_later(c, f"t{i}") for i in range(2)]
    for resp in await asyncio.wait_for(asyncio.gather(*timed), 5):
        assert assert_openai_error(resp, 429)["code"] == "queue_timeout"
    assert budget.held == 0
    # Shutdown (503 shutting_down) for a queued request.
    queued = _later(c, "q")
    await wait_for(lambda: gate.queued == 1, what="queued")
    c.runtime.begin_shutdown()
    resp = await asyncio.wait_for(queued, 5)
    assert assert_openai_error(resp, 503)["code"] == "shutting_down"
    assert budget.held == 0
    assert gate.end("a")


async def test_a_flood_of_new_agents_is_answered_and_leaves_nothing_held(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**BUDGET)
    budget = c.runtime.proxy.budget
    assert (await _step(c, "a")).status_code == 200
    flood = [_later(c, f"f{i}", done=True) for i in range(40)]
    await wait_for(lambda: budget.refused == 37, what="all but three refused")
    assert budget.held == 3 * len(_body("f0")) and budget.peak <= 70_000
    assert (await _step(c, "a", done=True)).status_code == 200
    codes = sorted(r.status_code for r in await asyncio.wait_for(asyncio.gather(*flood), 10))
    assert codes == [200] * 3 + [503] * 37
    assert budget.held == 0


def test_the_budget_is_a_setting_at_least_one_body() -> None:
    assert load_settings(env={}).server.max_held_bytes == 1 << 30
    assert load_settings(env={}, overrides={"server.max_held_bytes": 0}).server.max_held_bytes == 0
    with pytest.raises(ConfigError, match=r"max_held_bytes .*at least max_body_bytes"):
        load_settings(env={}, overrides={"server.max_held_bytes": 1 << 20})
    with pytest.raises(ConfigError, match=r"server\.max_held_bytes"):
        load_settings(env={}, overrides={"server.max_held_bytes": -1})


async def test_upstream_settings_and_overload_metrics(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{**BUDGET, "upstream.keepalive": 2.0, "upstream.max_connections": 3})
    up = c.runtime.upstream
    assert up is not None and up.keepalive_limit == 2.0 and up.max_connections == 3
    assert (await _step(c, "a")).status_code == 200
    waiting = _later(c, "q", done=True)
    await wait_for(lambda: c.runtime.gate.queued == 1, what="queued")
    metrics = (await c.client.get("/metrics")).text
    assert f"concur_held_body_bytes {float(len(_body('q')))}" in metrics
    assert "concur_held_body_bytes_limit 70000.0" in metrics
    assert 'concur_upstream_connections{state="idle"} 1.0' in metrics
    assert 'concur_upstream_connections{state="busy"} 0.0' in metrics
    for name in ("connection_waiting", "connection_waits_total", "retries_total"):
        assert f"concur_upstream_{name} 0.0" in metrics, name
    assert (await _step(c, "a", done=True)).status_code == 200
    assert (await asyncio.wait_for(waiting, 5)).status_code == 200
    assert "concur_held_body_bytes 0.0" in (await c.client.get("/metrics")).text


async def test_a_new_agent_named_by_its_headers_is_refused_before_its_body_is_read(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**BUDGET)
    gate = c.runtime.gate
    assert (await _step(c, "a")).status_code == 200
    waiting = [_later(c, f"q{i}", done=True) for i in range(3)]
    await wait_for(lambda: gate.queued == 3, what="three queued")
    host, port = c.server.host, c.server.port
    reader, writer = await asyncio.open_connection(host, port)
    # Headers and a first piece of a 30 kB body, the rest never sent: the answer comes.
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{AGENT}: unread\r\n"
        "Content-Type: application/json\r\nContent-Length: 30000\r\n\r\n".encode()
        + b'{"model": "m", "messages": ['
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 503 "), status
    writer.close()
    assert (await _step(c, "a", done=True)).status_code == 200
    assert [r.status_code for r in await asyncio.wait_for(asyncio.gather(*waiting), 5)] == [200] * 3
    assert c.runtime.proxy.budget.held == 0


async def test_agents_named_by_their_bodies_are_told_apart_once_read(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{**BUDGET, "admission.identity": "body:user"})
    gate, budget = c.runtime.gate, c.runtime.proxy.budget

    async def post(agent: str, *, done: bool = False) -> httpx.Response:
        headers = {"Content-Type": "application/json", **(DONE if done else {})}
        return await c.client.post("/v1/chat/completions", content=_body(agent), headers=headers)

    assert (await post("a")).status_code == 200
    waiting = [asyncio.create_task(post(f"q{i}", done=True)) for i in range(3)]
    await wait_for(lambda: gate.queued == 3, what="three queued")
    # Past the budget: the admitted agent runs, a new one is refused once its body is read.
    assert (await post("a")).status_code == 200
    assert assert_openai_error(await post("late"), 503)["code"] == "overloaded"
    assert gate.get("late") is None and budget.held == 3 * len(_body("q0"))
    assert (await post("a", done=True)).status_code == 200
    assert [r.status_code for r in await asyncio.wait_for(asyncio.gather(*waiting), 5)] == [200] * 3
    assert budget.held == 0 and budget.refused == 1


def test_headers_name_an_agent_only_when_no_body_source_comes_first() -> None:
    from multidict import CIMultiDict

    from concur._budget import header_agent
    from concur.identity import IdentityExtractor

    headers = CIMultiDict({"X-Session-Id": "s1"})
    assert header_agent(IdentityExtractor(["header:X-Session-Id", "body:user"]), headers) == "s1"
    assert header_agent(IdentityExtractor(["body:user", "header:X-Session-Id"]), headers) is None
    assert header_agent(IdentityExtractor(["header:X-Other", "body:user"]), headers) is None
    bad = CIMultiDict({"X-Session-Id": "x" * 300})  # too long: the inspect layer answers it
    assert header_agent(IdentityExtractor(["header:X-Session-Id"]), bad) is None


async def test_anonymous_steps_past_the_budget_are_new_agents(
    start_concur: Start, fake: FakeVLLM
) -> None:
    # Anonymous requests gated (as one-step agents), not bypassed as by default.
    settings = {**BUDGET, "admission.identity": "header:X-Concur-Agent-Id"}
    c = await start_concur(**settings, **{"admission.anonymous": "gate"})
    gate = c.runtime.gate
    assert (await _step(c, "a")).status_code == 200
    waiting = [_later(c, f"q{i}", done=True) for i in range(3)]
    await wait_for(lambda: gate.queued == 3, what="three queued")
    headers = {"Content-Type": "application/json"}
    resp = await c.client.post("/v1/chat/completions", content=_body("anon"), headers=headers)
    assert assert_openai_error(resp, 503)["code"] == "overloaded"
    assert gate.queued == 3
    assert (await _step(c, "a", done=True)).status_code == 200
    assert [r.status_code for r in await asyncio.wait_for(asyncio.gather(*waiting), 5)] == [200] * 3
