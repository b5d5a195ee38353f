"""Helpers shared by the tests: concur started in-process in front of a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from concur.admission import GateEvent
from concur.app import RUNTIME, Server, build_app
from concur.config import Settings, load_settings
from concur.runtime import Runtime

FAST = {
    "engine.poll_interval": 0.05,
    "engine.poll_timeout": 0.5,
    "engine.stale_after": 1.0,
    "control.interval": 0.05,
    "upstream.connect_timeout": 1.0,
    "upstream.first_byte_timeout": 5.0,
    "upstream.read_timeout": 5.0,
    "server.drain_timeout": 5.0,
    "admission.max_queue_wait": 5.0,
    "policy.name": "static:4",
}
AGENT = "X-Concur-Agent-Id"
DONE = {"X-Concur-Agent-Done": "1"}


async def wait_for(pred: Callable[[], bool], within: float = 3.0, what: str = "") -> None:
    """Poll ``pred`` until true; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.01)


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].lstrip() for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def sse_json(text: str) -> list[dict[str, Any]]:
    return [json.loads(d) for d in sse_events(text) if d != "[DONE]"]


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["param"] is None
    assert err["message"]
    error: dict[str, Any] = err
    return error


@dataclass
class Concur:
    """One running concur in front of one upstream, with an httpx client for it."""

    server: Server
    settings: Settings
    client: httpx.AsyncClient
    stopped: bool = False
    check_empty: bool = True
    extra_clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def runtime(self) -> Runtime:
        return self.server.app[RUNTIME]

    async def status(self) -> dict[str, Any]:
        r = await self.client.get("/concur/status")
        assert r.status_code == 200
        data: dict[str, Any] = r.json()
        return data

    async def wait_fresh(self) -> None:
        await wait_for(
            lambda: (
                not self.runtime.poller.is_stale()
                and self.runtime.controller.last is not None
                and not self.runtime.controller.last.stale
            ),
            what="a fresh engine signal",
        )

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.server.stop()


def record_events(c: Concur) -> list[GateEvent]:
    """Every gate event of ``c`` from now on, in order (its metrics and logs still see them)."""
    gate = c.runtime.gate
    events: list[GateEvent] = []
    inner = gate.on_event

    def on_event(event: GateEvent) -> None:
        events.append(event)
        if inner is not None:
            inner(event)

    gate.on_event = on_event
    return events


Start = Callable[..., Awaitable[Concur]]


@contextlib.asynccontextmanager
async def concur_starter(
    default_upstream: str, defaults: Mapping[str, Any]
) -> AsyncIterator[Start]:
    """``start(**{"dotted.key": value})`` starts concur in front of ``default_upstream``
    (or ``start(upstream=...)``) with
    ``defaults`` under the overrides; on exit every concur started is checked for an
    empty gate (active == 0, queued == 0) unless told not to, then stopped."""
    started: list[Concur] = []

    async def start(upstream: str | None = None, **overrides: Any) -> Concur:
        values = {**defaults, "upstream.url": upstream or default_upstream, **overrides}
        settings = load_settings(overrides=values, env={})
        server = Server(
            build_app(settings), "127.0.0.1", 0, drain_timeout=settings.server.drain_timeout
        )
        await server.start()
        # verify=False: loopback http only, and it skips loading a CA bundle (~0.1 s a client)
        client = httpx.AsyncClient(base_url=server.url, timeout=10.0, trust_env=False, verify=False)
        c = Concur(server=server, settings=settings, client=client)
        started.append(c)
        return c

    yield start
    for c in started:
        try:
            if c.check_empty and not c.stopped:
                gate = c.runtime.gate
                await wait_for(
                    lambda g=gate: g.active == 0 and g.queued == 0,
                    within=3.0,
                    what="an empty gate at the end of the scenario",
                )
        finally:
            await c.client.aclose()
            for extra in c.extra_clients:
                await extra.aclose()
            await c.stop()
