"""The poller against a real aiohttp server on loopback: ok, 5xx, garbage, timeout, refused."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from concur.adapters import Adapter, EngineSignal, get_adapter, registry
from concur.poller import Poller, PollState

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "metrics"
VLLM_PAGE = (FIXTURES / "vllm-0.11.0.txt").read_text()
VLLM = get_adapter("vllm")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Engine:
    """A loopback vLLM stand-in whose answers the test controls."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.body = VLLM_PAGE
        self.requests = 0
        self.release = asyncio.Event()
        self.url = ""

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.mode == "trickle":  # a valid page, one line every 0.1 s, never ending
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            for line in itertools.cycle(self.body.splitlines(keepends=True)):
                await resp.write(line.encode())
                await asyncio.sleep(0.1)
        if self.mode == "error":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "garbage":
            return web.Response(text="<html>upstream exploded</html>", content_type="text/html")
        if self.mode == "slow":
            await self.release.wait()
        return web.Response(text=self.body, content_type="text/plain")


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    server = Engine()
    app = web.Application()
    app.router.add_get("/metrics", server.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    yield server
    server.release.set()
    await runner.cleanup()


@pytest.fixture
def log_name(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> str:
    """A logger of the test's own (propagating to caplog whatever concur's setup did)."""
    name = f"test_poller.{request.node.name}"
    caplog.set_level(logging.DEBUG, logger=name)
    return name


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == name]


async def wait_for(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_poll_once_ok(engine: Engine, log_name: str) -> None:
    clock = FakeClock(500.0)
    poller = Poller(engine.url, VLLM, clock=clock, logger=logging.getLogger(log_name))
    try:
        signal = await poller.poll_once()
    finally:
        await poller.stop()
    assert signal is not None
    assert poller.signal is signal
    assert signal.timestamp == 500.0
    assert poller.taken_at == 500.0
    assert (signal.kv_usage, signal.running, signal.waiting) == (0.8125, 12, 4)
    assert poller.last_error is None
    assert poller.state is PollState.OK
    assert poller.next_delay() == poller.poll_interval  # no failure to back off from


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("error", r"/metrics: HTTP 500 Internal Server Error"),
        ("garbage", r"/metrics: the vLLM metrics page is not a Prometheus text exposition"),
    ],
)
async def test_bad_answers_keep_the_last_good_signal(
    engine: Engine, mode: str, message: str
) -> None:
    clock = FakeClock(10.0)
    async with httpx.AsyncClient() as client:
        poller = Poller(engine.url, VLLM, client=client, clock=clock)
        good = await poller.poll_once()
        engine.mode = mode
        clock.now = 11.0
        assert await poller.poll_once() is None
    assert poller.signal is good
    assert poller.taken_at == 10.0
    assert poller.next_delay() == 2 * poller.poll_interval  # one failure
    assert poller.state is PollState.FAILING
    assert poller.last_error is not None
    assert poller.last_error.startswith(f"GET {engine.url}/metrics")
    assert re.search(message, poller.last_error)


@pytest.mark.parametrize(
    ("mode", "limit", "within"),
    [
        ("slow", 0.2, 2.0),  # no answer at all
        ("trickle", 0.3, 1.5),  # every read is quick: only a limit on the whole request ends it
    ],
)
async def test_timeout(engine: Engine, mode: str, limit: float, within: float) -> None:
    engine.mode = mode
    poller = Poller(engine.url, VLLM, timeout=limit)
    started = time.monotonic()
    try:
        assert await poller.poll_once() is None
    finally:
        await poller.stop()
    assert time.monotonic() - started < within
    assert poller.last_error is not None
    assert f"timed out after {limit:g} s" in poller.last_error
    assert poller.signal is None


async def test_a_page_over_the_size_limit_is_refused(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "MAX_PAGE_BYTES", len(VLLM_PAGE) - 1)
    poller = Poller(engine.url, VLLM, timeout=2.0)
    try:
        assert await poller.poll_once() is None
        assert poller.last_error is not None and "the page is over" in poller.last_error
        monkeypatch.setattr(registry, "MAX_PAGE_BYTES", len(VLLM_PAGE))
        assert await poller.poll_once() is not None
    finally:
        await poller.stop()


async def test_connection_refused() -> None:
    poller = Poller(f"http://127.0.0.1:{closed_port()}", VLLM, timeout=1.0)
    try:
        assert await poller.poll_once() is None
        assert await poller.poll_once() is None
    finally:
        await poller.stop()
    assert poller.last_error is not None
    assert "cannot connect" in poller.last_error
    assert poller.next_delay() == 4 * poller.poll_interval  # two failures
    assert poller.signal is None
    assert poller.is_stale()


async def test_recovery_clears_the_error(engine: Engine) -> None:
    engine.mode = "error"
    poller = Poller(engine.url, VLLM)
    try:
        await poller.poll_once()
        await poller.poll_once()
        assert poller.next_delay() == 4 * poller.poll_interval  # two failures
        engine.mode = "ok"
        assert await poller.poll_once() is not None
    finally:
        await poller.stop()
    assert poller.next_delay() == poller.poll_interval
    assert poller.last_error is None
    assert poller.state is PollState.OK


async def test_stale_marking_with_a_fake_clock(engine: Engine) -> None:
    clock = FakeClock(100.0)
    poller = Poller(engine.url, VLLM, clock=clock, stale_after=3.0)
    assert poller.age() is None
    assert poller.is_stale()
    try:
        await poller.poll_once()
        assert poller.age() == 0.0
        assert not poller.is_stale()
        clock.now = 103.0
        assert poller.age() == 3.0
        assert not poller.is_stale()
        assert poller.is_stale(103.5)
        assert poller.age(101.5) == 1.5
        clock.now = 104.0
        assert poller.is_stale()
        engine.mode = "error"
        await poller.poll_once()  # a failure does not refresh the signal
        assert poller.is_stale()
        engine.mode = "ok"
        await poller.poll_once()
        assert not poller.is_stale()
        assert poller.taken_at == 104.0
    finally:
        await poller.stop()


async def test_backoff_doubles_and_is_capped() -> None:
    poller = Poller(f"http://127.0.0.1:{closed_port()}", VLLM, poll_interval=0.5, max_backoff=5.0)
    delays = [poller.next_delay()]
    try:
        for _ in range(6):
            await poller.poll_once()
            delays.append(poller.next_delay())
    finally:
        await poller.stop()
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


async def test_logs_state_changes_once(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    name = "test_poller.log_once"
    caplog.set_level(logging.DEBUG, logger=name)
    poller = Poller(engine.url, VLLM, logger=logging.getLogger(name))
    try:
        await poller.poll_once()
        await poller.poll_once()
        engine.mode = "error"
        for _ in range(5):
            await poller.poll_once()
        engine.mode = "garbage"
        for _ in range(3):
            await poller.poll_once()
        engine.mode = "ok"
        for _ in range(3):
            await poller.poll_once()
    finally:
        await poller.stop()
    assert events(caplog, name) == [
        (logging.INFO, "engine_poll_ok"),
        (logging.WARNING, "engine_poll_failing"),
        (logging.INFO, "engine_poll_recovered"),
    ]
    failing = next(r for r in caplog.records if r.getMessage() == "engine_poll_failing")
    fields = failing.__dict__["concur_fields"]
    assert "HTTP 500" in fields["error"]
    assert fields["url"] == f"{engine.url}/metrics"
    recovered = next(r for r in caplog.records if r.getMessage() == "engine_poll_recovered")
    assert recovered.__dict__["concur_fields"]["failed_polls"] == 8


async def test_failing_from_the_start_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    name = "test_poller.failing_start"
    caplog.set_level(logging.DEBUG, logger=name)
    poller = Poller(f"http://127.0.0.1:{closed_port()}", VLLM, logger=logging.getLogger(name))
    try:
        for _ in range(4):
            await poller.poll_once()
    finally:
        await poller.stop()
    assert events(caplog, name) == [(logging.WARNING, "engine_poll_failing")]


async def test_background_loop_polls_backs_off_and_recovers(engine: Engine) -> None:
    poller = Poller(engine.url, VLLM, poll_interval=0.05, max_backoff=0.4, timeout=1.0)
    poller.start()
    try:
        assert poller.running
        await wait_for(lambda: poller.signal is not None)
        start = engine.requests
        await asyncio.sleep(0.5)
        healthy = engine.requests - start
        assert 5 <= healthy <= 12, healthy  # about one poll every 50 ms

        engine.mode = "error"
        await wait_for(lambda: poller.next_delay() >= 0.4)  # three failures or more
        start = engine.requests
        await asyncio.sleep(0.5)
        failing = engine.requests - start
        assert failing <= 3, failing  # backed off to 400 ms between polls

        engine.mode = "ok"
        await wait_for(lambda: poller.state is PollState.OK, within=2.0)
        assert poller.last_error is None
    finally:
        await poller.stop()
    assert not poller.running
    after_stop = engine.requests
    await asyncio.sleep(0.2)
    assert engine.requests == after_stop


async def test_loop_survives_garbage_and_timeouts(engine: Engine) -> None:
    poller = Poller(engine.url, VLLM, poll_interval=0.02, max_backoff=0.05, timeout=0.1)
    poller.start()
    try:
        engine.mode = "garbage"
        await wait_for(lambda: poller.next_delay() >= 0.05)  # two failures or more
        engine.mode = "slow"
        await wait_for(lambda: "timed out" in (poller.last_error or ""))
        engine.mode = "ok"
        engine.release.set()
        await wait_for(lambda: poller.state is PollState.OK)
        assert poller.running
    finally:
        await poller.stop()


async def test_a_crashing_parser_does_not_kill_the_loop(engine: Engine) -> None:
    calls = 0

    def broken(text: str, timestamp: float) -> EngineSignal:
        nonlocal calls
        calls += 1
        raise RuntimeError("parser bug")

    adapter = Adapter("vllm", "/metrics", broken, "broken")
    poller = Poller(engine.url, adapter, poll_interval=0.02, max_backoff=0.05)
    poller.start()
    try:
        await wait_for(lambda: calls >= 3)
        assert poller.running
    finally:
        await poller.stop()
    assert poller.last_error is not None
    assert "unexpected RuntimeError: parser bug" in poller.last_error


async def test_start_and_stop_are_idempotent(engine: Engine) -> None:
    poller = Poller(engine.url, VLLM, poll_interval=0.05)
    poller.start()
    task_started = poller.running
    poller.start()
    await wait_for(lambda: poller.signal is not None)
    await poller.stop()
    await poller.stop()
    assert task_started
    assert not poller.running
    poller.start()  # a stopped poller can start again with a fresh client
    try:
        before = engine.requests
        await wait_for(lambda: engine.requests > before)
    finally:
        await poller.stop()


async def test_a_given_client_is_not_closed(engine: Engine) -> None:
    async with httpx.AsyncClient() as client:
        poller = Poller(engine.url, VLLM, client=client)
        await poller.poll_once()
        await poller.stop()
        assert not client.is_closed
    own = Poller(engine.url, VLLM)
    await own.poll_once()
    await own.stop()
    assert own.signal is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poll_interval": 0}, "poll_interval must be a positive number"),
        ({"timeout": -1.0}, "timeout must be a positive number"),
        ({"stale_after": float("nan")}, "stale_after must be a positive number"),
        ({"poll_interval": 2.0, "max_backoff": 1.0}, "set max_backoff >= poll_interval"),
    ],
)
def test_parameters_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Poller("http://127.0.0.1:1", VLLM, **kwargs)
