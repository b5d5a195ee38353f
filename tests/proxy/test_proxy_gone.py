"""Gone agents and waiting that informs (issue 18, points 1 and 2), over real HTTP.

A client killed mid-request or mid-queue frees what it held within seconds; a live
agent in a long tool call it has made before keeps its slot; ordinary one-off
traffic holds no slot; a waiting request's 429 (and the status page meanwhile) says
why it waited; a client with the openai SDK's defaults gets that answer in time.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
import openai
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import (
    AGENT,
    DONE,
    Concur,
    Start,
    assert_openai_error,
    chat,
    record_events,
    wait_for,
)

CHAT = "/v1/chat/completions"

# A client in a process of its own: one streaming step, "started" once the response
# began, then it waits to be killed (SIGKILL: no goodbye, the kernel closes the socket).
KILLED_CLIENT = """
import socket, sys
port, agent, stream = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
head = (
    f"POST /v1/chat/completions HTTP/1.1\\r\\nHost: concur\\r\\n"
    f"Content-Type: application/json\\r\\nContent-Length: {len(body)}\\r\\n"
    f"X-Concur-Agent-Id: {agent}\\r\\nX-Fake-Delay: 0.5\\r\\nX-Fake-Tokens: 1000\\r\\n\\r\\n"
)
s = socket.create_connection(("127.0.0.1", port))
s.sendall(head.encode() + body)
if stream:
    s.recv(1)
print("started", flush=True)
sys.stdin.read()
"""


async def killed_client(c: Concur, agent: str, *, stream: bool) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_CLIENT,
        str(c.server.port),
        agent,
        "1" if stream else "0",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert line.strip() == b"started"
    return proc


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.kill()
    await proc.wait()


async def step(c: Concur, agent: str, *, done: bool = False, **kw: Any) -> httpx.Response:
    headers = {AGENT: agent, **(DONE if done else {})}
    return await c.client.post(CHAT, json=chat(), headers=headers, **kw)


# ------------------------------------------------------------ point 1: gone agents


async def test_a_killed_client_frees_its_slot_within_seconds(
    start_concur: Start, fake: FakeVLLM
) -> None:
    """The default admission settings: a client killed mid-stream frees its agent's slot
    after admission.disconnect_grace (5 s), not idle_timeout (300 s); one killed while
    queued leaves no trace at once."""
    c = await start_concur(**{"policy.name": "static:1", "admission.max_queue_wait": 60.0})
    gate = c.runtime.gate
    events = record_events(c)
    worker = await killed_client(c, "worker", stream=True)
    assert [a.agent_id for a in gate.agents()] == ["worker"]
    queued = await killed_client(c, "queued", stream=False)
    await wait_for(lambda: gate.queued == 1, what="the second client queued")
    waiting = asyncio.create_task(step(c, "next", done=True))
    await wait_for(lambda: gate.queued == 2, what="the third agent queued")

    await kill(queued)
    await wait_for(lambda: gate.get("queued") is None, what="the killed queued client gone")
    await kill(worker)
    resp = await asyncio.wait_for(waiting, 20)  # liveness: "seconds", not minutes
    assert resp.status_code == 200
    ended = {e.agent_id: e.detail for e in events if e.kind == "ended"}
    assert ended["worker"] == "gone"
    assert "queued" not in ended  # never admitted: no trace
    assert [e.kind for e in events if e.agent_id == "queued"] == ["queued", "cancelled"]


async def test_a_live_agent_in_a_long_pause_it_has_made_before_keeps_its_slot(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(
        **{
            "policy.name": "static:1",
            "admission.idle_timeout_min": 0.2,
            "admission.idle_timeout_new": 0.6,
            "admission.idle_pause_factor": 4.0,
        }
    )
    gate = c.runtime.gate
    events = record_events(c)
    assert (await step(c, "tool-user")).status_code == 200
    await asyncio.sleep(0.5)  # its pauses so far: 0.5 s, so it may idle 2 s
    assert (await step(c, "tool-user")).status_code == 200
    await asyncio.sleep(1.2)  # a longer tool call, within 4 x its longest
    assert (await step(c, "tool-user")).status_code == 200
    agent = gate.get("tool-user")
    assert agent is not None and agent.requests == 3  # the same admission throughout
    assert not [e for e in events if e.kind == "ended"]
    rows = (await c.client.get("/concur/agents")).json()["agents"]
    assert rows[0]["longest_pause_seconds"] >= 1.2
    assert rows[0]["idle_timeout_seconds"] == pytest.approx(
        4 * rows[0]["longest_pause_seconds"], abs=0.01
    )
    # Gone for good: its slot is freed at 4 x its longest pause.
    await wait_for(lambda: gate.get("tool-user") is None, within=15, what="reaped")
    assert [e.detail for e in events if e.kind == "ended"] == ["idle"]


# ------------------------------------------------------- point 2: waiting that informs


async def test_one_off_traffic_holds_no_slot(start_concur: Start, fake: FakeVLLM) -> None:
    """With the window full: no agent id, or only OpenAI's ``user`` field, goes straight
    through (the defaults); a one-off X-Session-Id request is an agent that ends once it
    has been idle idle_timeout_new."""
    c = await start_concur(**{"policy.name": "static:1", "admission.idle_timeout_new": 0.3})
    gate = c.runtime.gate
    assert (await step(c, "holder")).status_code == 200
    plain = await c.client.post(CHAT, json=chat(), timeout=5)
    with_user = await c.client.post(CHAT, json=chat(user="alice"), timeout=5)
    assert (plain.status_code, with_user.status_code) == (200, 200)
    assert [a.agent_id for a in gate.agents()] == ["holder"]
    assert (await step(c, "holder", done=True)).status_code == 200
    session = await c.client.post(CHAT, json=chat(), headers={"X-Session-Id": "s1"})
    assert session.status_code == 200
    assert gate.get("s1") is not None
    await wait_for(lambda: gate.get("s1") is None, within=10, what="one-off session ended")


async def test_a_429_and_the_status_page_say_why_an_agent_waits(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(
        **{
            "policy.name": "static:1",
            "admission.max_queue_wait": 1.0,
            "admission.retry_after": 2,
            "control.failure_mode": "closed",
        }
    )
    gate = c.runtime.gate
    await c.wait_fresh()
    assert (await step(c, "holder")).status_code == 200
    waiting = asyncio.create_task(step(c, "b"))
    await wait_for(lambda: gate.queued == 1, what="b queued")
    status = await c.status()
    assert status["waiting"] == {"window_full": 1}
    assert status["queue_reason"].startswith("the window is full (1 of 1 slots live)")
    rows = {r["id"]: r for r in (await c.client.get("/concur/agents")).json()["agents"]}
    assert rows["b"]["waiting_for"] == "window_full" and rows["holder"]["waiting_for"] is None
    resp = await asyncio.wait_for(waiting, 10)
    err = assert_openai_error(resp, 429)
    assert err["code"] == "queue_timeout"
    assert "because the window is full (1 of 1 slots live)" in err["message"]
    assert resp.headers["Retry-After"] == "2"

    fake.metrics_fault = "500"  # the engine's metrics go stale: failure_mode closed
    await wait_for(lambda: not c.runtime.gate.admit_new, what="a stale signal applied")
    assert (await step(c, "holder", done=True)).status_code == 200
    waiting = asyncio.create_task(step(c, "c"))
    await wait_for(lambda: gate.queued == 1, what="c queued")
    assert (await c.status())["waiting"] == {"engine_stale": 1}
    err = assert_openai_error(await asyncio.wait_for(waiting, 10), 429)
    assert (
        "because the engine's metrics are stale and control.failure_mode is closed"
        in (err["message"])
    )
    fake.metrics_fault = None


async def test_an_openai_sdk_client_gets_the_reason(start_concur: Start, fake: FakeVLLM) -> None:
    """The openai SDK at its defaults (600 s timeout, 2 retries) honours Retry-After and
    raises the 429's message, which says why, after three attempts."""
    c = await start_concur(
        **{"policy.name": "static:1", "admission.max_queue_wait": 0.3, "admission.retry_after": 1}
    )
    events = record_events(c)
    assert (await step(c, "holder")).status_code == 200
    client = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused")
    assert (client.max_retries, client.timeout) == (2, openai.DEFAULT_TIMEOUT)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            await asyncio.wait_for(
                client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={AGENT: "sdk"},
                ),
                30,
            )
    finally:
        await client.close()
    assert "the window is full" in info.value.message
    assert [e.kind for e in events if e.agent_id == "sdk"].count("timeout") == 3
    assert (await step(c, "holder", done=True)).status_code == 200
