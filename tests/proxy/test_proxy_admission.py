"""Admission on the request path: window, queue, timeouts, KV pressure, pausing, endings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Concur, Start, assert_openai_error, chat, wait_for


async def step(c: Concur, agent: str, *, done: bool = False, **kw: Any) -> httpx.Response:
    headers = {AGENT: agent, **(DONE if done else {})}
    return await c.client.post("/v1/chat/completions", json=chat(), headers=headers, **kw)


def later(c: Concur, agent: str, *, done: bool = False) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(step(c, agent, done=done))


async def test_third_agent_waits_for_a_slot(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:2"})
    gate = c.runtime.gate
    assert (await step(c, "a")).status_code == 200
    assert (await step(c, "b")).status_code == 200
    third = later(c, "c")
    await wait_for(lambda: gate.queued == 1, what="c queued")
    await asyncio.sleep(0.2)
    assert not third.done()
    assert len([s for s in fake.seen if s.path.endswith("completions")]) == 2
    # a's last step: its slot is freed when that response completes, and c goes in.
    assert (await step(c, "a", done=True)).status_code == 200
    resp = await asyncio.wait_for(third, 2)
    assert resp.status_code == 200
    assert {a.agent_id for a in gate.agents()} == {"b", "c"}
    assert (await step(c, "b", done=True)).status_code == 200
    assert (await step(c, "c", done=True)).status_code == 200


async def test_queue_timeout_gives_429_with_retry_after(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"policy.name": "static:1", "admission.max_queue_wait": 0.3})
    assert (await step(c, "a")).status_code == 200
    t0 = time.monotonic()
    resp = await step(c, "b")
    waited = time.monotonic() - t0
    err = assert_openai_error(resp, 429)
    assert err["code"] == "queue_timeout" and err["type"] == "rate_limit_error"
    assert "the window is full" in err["message"]
    assert resp.headers["retry-after"] == "5"  # admission.retry_after
    assert 0.25 <= waited < 1.0
    assert c.runtime.gate.queued == 0
    assert (await step(c, "a", done=True)).status_code == 200


async def test_queue_full_gives_429_at_once(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:1", "admission.max_queue_len": 0})
    assert (await step(c, "a")).status_code == 200
    t0 = time.monotonic()
    resp = await step(c, "b")
    assert time.monotonic() - t0 < 0.5
    assert assert_openai_error(resp, 429)["code"] == "queue_full"
    assert int(resp.headers["retry-after"]) >= 1
    assert (await step(c, "a", done=True)).status_code == 200


async def test_high_kv_usage_shrinks_window_admitted_agents_continue(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(
        **{
            "policy.name": "aimd",
            "policy.aimd.initial_window": 4,
            "policy.aimd.start_open": False,
            "policy.aimd.decrease_cooldown": 0,
            "policy.aimd.pause": False,
        }
    )
    gate = c.runtime.gate
    await c.wait_fresh()
    assert (await step(c, "a")).status_code == 200
    assert (await step(c, "b")).status_code == 200
    assert gate.window == 4
    fake.kv_usage = 0.95
    await wait_for(lambda: gate.window == 1, what="the window to shrink to 1")
    newcomer = later(c, "c", done=True)
    await wait_for(lambda: gate.queued == 1, what="c queued")
    # Admitted agents keep going while the newcomer waits.
    for _ in range(3):
        assert (await step(c, "a")).status_code == 200
        assert (await step(c, "b")).status_code == 200
    assert not newcomer.done()
    status = await c.status()
    assert status["pressure"] >= 0.95 and status["pressure_parts"]["kv"] == 0.95
    assert status["live"] == 2 and status["queued"] == 1 and status["window"] == 1
    # Headroom again: the window grows (it is in use) and c is admitted.
    fake.kv_usage = 0.1
    resp = await asyncio.wait_for(newcomer, 3)
    assert resp.status_code == 200
    assert gate.window is not None and gate.window >= 3
    assert (await step(c, "a", done=True)).status_code == 200
    assert (await step(c, "b", done=True)).status_code == 200


async def test_paused_agent_waits_at_its_next_step(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(
        **{
            "policy.name": "aimd",
            "policy.aimd.initial_window": 2,
            "policy.aimd.start_open": False,
            "policy.aimd.decrease_cooldown": 0,
        }
    )
    gate = c.runtime.gate
    await c.wait_fresh()
    assert (await step(c, "old")).status_code == 200
    assert (await step(c, "new")).status_code == 200
    fake.kv_usage = 0.95
    await wait_for(lambda: gate.paused == 1, what="the newest agent paused")
    held = later(c, "new")
    await asyncio.sleep(0.3)
    assert not held.done()
    assert (await step(c, "old")).status_code == 200  # the older agent stays live
    fake.kv_usage = 0.1
    resp = await asyncio.wait_for(held, 3)
    assert resp.status_code == 200
    assert gate.paused == 0
    assert (await step(c, "old", done=True)).status_code == 200
    assert (await step(c, "new", done=True)).status_code == 200


async def test_anonymous_requests_are_one_step_agents(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:1", "admission.anonymous": "gate"})
    gate = c.runtime.gate
    assert (await step(c, "holder")).status_code == 200
    anon = asyncio.create_task(c.client.post("/v1/chat/completions", json=chat()))
    await wait_for(lambda: gate.queued == 1, what="the anonymous request queued")
    assert (await step(c, "holder", done=True)).status_code == 200
    assert (await asyncio.wait_for(anon, 2)).status_code == 200
    # Done after its one request.
    await wait_for(lambda: gate.active == 0, what="anonymous agent ended")


async def test_anonymous_bypass(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:1"})  # bypass: the default
    assert (await step(c, "holder")).status_code == 200
    resp = await c.client.post("/v1/chat/completions", json=chat(), timeout=2)
    assert resp.status_code == 200
    assert [a.agent_id for a in c.runtime.gate.agents()] == ["holder"]
    metrics = (await c.client.get("/metrics")).text
    assert 'concur_admissions_total{outcome="bypassed"} 1.0' in metrics
    assert (await step(c, "holder", done=True)).status_code == 200


async def test_idle_agents_are_reaped(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:1", "admission.idle_timeout": 0.3})
    assert (await step(c, "idle")).status_code == 200
    assert c.runtime.gate.active == 1
    waiting = later(c, "next", done=True)
    resp = await asyncio.wait_for(waiting, 3)  # admitted once the idle agent is reaped
    assert resp.status_code == 200
    assert c.runtime.gate.get("idle") is None


async def test_usage_from_json_sets_context(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    body = chat("y" * 800)
    r = await c.client.post("/v1/chat/completions", json=body, headers={AGENT: "ctx"})
    usage = r.json()["usage"]
    agent = c.runtime.gate.get("ctx")
    assert agent is not None
    assert agent.context_tokens == usage["prompt_tokens"] + usage["completion_tokens"]
    agents = (await c.client.get("/concur/agents")).json()["agents"]
    assert agents[0]["id"] == "ctx" and agents[0]["context_tokens"] == agent.context_tokens
    assert agents[0]["state"] == "live" and agents[0]["requests"] == 1
    assert {"since", "in_flight"} <= set(agents[0])
    assert (await step(c, "ctx", done=True)).status_code == 200
