"""Graceful shutdown: in-flight requests finish, queued agents get 503, exit code 0."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time

import httpx
import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, assert_openai_error, chat, wait_for


async def test_drain_finishes_in_flight_and_refuses_queued(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"policy.name": "static:1"})
    gate = c.runtime.gate
    slow = {AGENT: "a", "X-Fake-Delay": "0.15", "X-Fake-Tokens": "5", **DONE}
    other = httpx.AsyncClient(base_url=c.url, timeout=10, trust_env=False)
    c.extra_clients.append(other)
    in_flight = asyncio.create_task(
        c.client.post("/v1/chat/completions", json=chat(stream=True), headers=slow)
    )
    await wait_for(lambda: gate.active == 1, what="a admitted")
    queued = asyncio.create_task(
        other.post("/v1/chat/completions", json=chat(), headers={AGENT: "b"})
    )
    await wait_for(lambda: gate.queued == 1, what="b queued")

    t0 = time.monotonic()
    stopping = asyncio.create_task(c.stop())
    refused = await asyncio.wait_for(queued, 1.0)
    err = assert_openai_error(refused, 503)
    assert err["code"] == "shutting_down"
    assert time.monotonic() - t0 < 0.5
    done = await asyncio.wait_for(in_flight, 3.0)
    assert done.status_code == 200
    assert done.text.endswith("data: [DONE]\n\n")
    await asyncio.wait_for(stopping, 3.0)
    assert gate.active == 0 and gate.queued == 0
    assert c.runtime.proxy is not None and c.runtime.proxy.in_flight == 0
    # No longer listening.
    with pytest.raises(httpx.ConnectError):
        await httpx.AsyncClient(trust_env=False).get(c.url + "/healthz")


async def test_drain_timeout_bounds_shutdown(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"server.drain_timeout": 0.3})
    gate = c.runtime.gate
    endless = {AGENT: "z", "X-Fake-Delay": "1", "X-Fake-Tokens": "30", "X-Test-Id": "z", **DONE}
    task = asyncio.create_task(
        c.client.post("/v1/chat/completions", json=chat(stream=True), headers=endless)
    )
    await wait_for(lambda: gate.active == 1, what="z admitted")
    t0 = time.monotonic()
    await c.stop()
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(httpx.HTTPError):
        await asyncio.wait_for(task, 2.0)
    assert gate.active == 0 and gate.queued == 0
    await wait_for(lambda: "z" in fake.cancelled, what="upstream cancelled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_cli_serve_exits_0_on_sigterm(fake: FakeVLLM) -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "concur",
        "serve",
        "--upstream",
        fake.url,
        "--listen",
        f"127.0.0.1:{port}",
        "--policy",
        "static:2",
        "--log-format",
        "json",
        "--set",
        "engine.poll_interval=0.1",
        "--set",
        "control.interval=0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "CONCUR_SERVER__DRAIN_TIMEOUT": "2"},
    )
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/healthz")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "concur serve did not start"
                await asyncio.sleep(0.05)
            r = await client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=chat(),
                headers={AGENT: "cli", **DONE},
            )
            assert r.status_code == 200
            status = (await client.get(f"http://127.0.0.1:{port}/concur/status")).json()
            assert status["policy"] == {"name": "static", "window": 2}
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert {"listening", "admission", "draining", "stopped"} <= set(names), names
    admitted = [e for e in events if e["event"] == "admission" and e["outcome"] == "admitted"]
    assert admitted and admitted[0]["agent"] == "cli"
