"""Fault matrix, engine side: a broken ``/metrics`` never breaks the request path.

The engine's metrics come from a second fake (``engine.metrics_url``), so they can
fail (refused, timeout, 500, garbage, reset, missing KV gauge, counters going
backwards) while the upstream keeps answering. Each case checks what concur
reports, that agents are still served as ``control.failure_mode`` documents, and
that everything recovers when the metrics return.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Concur, Start, chat, wait_for
from fakes.invariants import Ledger, assert_invariants

from concur.control import TickRecord


@pytest.fixture
async def metrics_fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM() as f:
        yield f


async def _start(start_concur: Start, metrics_fake: FakeVLLM, **overrides: object) -> Concur:
    c = await start_concur(**{"engine.metrics_url": metrics_fake.url + "/metrics", **overrides})
    await c.wait_fresh()
    return c


async def _status_until(
    c: Concur, key: str, value: object, within: float = 5.0
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        status = await c.status()
        if status[key] == value:
            return status
        if loop.time() > deadline:
            raise AssertionError(f"status[{key!r}] stayed {status[key]!r}, wanted {value!r}")
        await asyncio.sleep(0.02)


async def _recovered(c: Concur, within: float = 5.0) -> dict[str, object]:
    """Wait for a fresh signal and a tick that consulted the policy again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        status = await c.status()
        if not status["stale"] and not str(status["decision"]).startswith("stale:"):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"never recovered: {status}")
        await asyncio.sleep(0.02)


async def _step(c: Concur, ledger: Ledger, agent: str, *, done: bool = False) -> None:
    headers = {AGENT: agent, **(DONE if done else {})}
    out = await ledger.send(c.client, "POST", "/v1/chat/completions", json=chat(), headers=headers)
    assert out.status == 200, out


BREAKS = {  # fault -> what the poll error must say
    "refused": "cannot connect",
    "timeout": "timed out",
    "500": "HTTP 500",
    "garbage": "not a Prometheus text exposition",
    "reset": "disconnected",
}


@pytest.mark.parametrize("fault", list(BREAKS))
async def test_metrics_failure_goes_stale_and_recovers(
    start_concur: Start, metrics_fake: FakeVLLM, ledger: Ledger, fault: str
) -> None:
    c = await _start(start_concur, metrics_fake, **{"policy.name": "static:2"})
    await _step(c, ledger, "before")
    if fault == "refused":
        await metrics_fake.stop()
    else:
        metrics_fake.metrics_fault = fault
    status = await _status_until(c, "stale", True)
    error = str(status["poll_error"])
    assert error and BREAKS[fault] in error, error
    status = await _status_until(c, "decision", "stale:hold")
    assert status["window"] == 2  # hold: the window is kept
    ready = await c.client.get("/readyz")
    assert ready.status_code == 503
    assert "stale" in " ".join(ready.json()["reasons"])
    # The request path does not care: agents keep being served.
    await _step(c, ledger, "before", done=True)
    await _step(c, ledger, "during", done=True)
    # The metrics come back: fresh again, the policy decides again.
    if fault == "refused":
        await metrics_fake.start()  # same port
    else:
        metrics_fake.metrics_fault = None
    status = await _recovered(c)
    assert status["poll_error"] is None
    assert (await c.client.get("/readyz")).status_code == 200
    await assert_invariants(c, ledger)


async def test_missing_kv_metric_reads_as_unknown(
    start_concur: Start, metrics_fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await _start(start_concur, metrics_fake, **{"policy.name": "aimd"})
    window = c.runtime.gate.window
    metrics_fake.metrics_fault = "missing-kv"
    scrapes = metrics_fake.metrics_scrapes
    await wait_for(lambda: metrics_fake.metrics_scrapes > scrapes + 2, what="scrapes")
    await wait_for(
        lambda: c.runtime.poller.signal is not None and c.runtime.poller.signal.kv_usage is None,
        what="a signal without KV",
    )
    # A missing gauge is unknown, never 0: the page is still a good reading.
    status = await _recovered(c)
    assert status["signal"]["kv_usage"] is None
    assert status["signal"]["running"] is not None
    assert status["pressure_parts"].get("kv") is None
    assert (await c.client.get("/readyz")).status_code == 200
    await _step(c, ledger, "a", done=True)
    assert c.runtime.gate.window == window
    metrics_fake.metrics_fault = None
    await wait_for(
        lambda: (
            c.runtime.poller.signal is not None
            and c.runtime.poller.signal.kv_usage == metrics_fake.kv_usage
        ),
        what="KV usage back",
    )
    await assert_invariants(c, ledger)


async def test_counters_going_backwards_are_an_engine_restart(
    start_concur: Start, metrics_fake: FakeVLLM, ledger: Ledger
) -> None:
    metrics_fake.preemptions = 500.0
    metrics_fake.prefix_hits = 9_000.0
    metrics_fake.prefix_queries = 10_000.0
    c = await _start(start_concur, metrics_fake, **{"policy.name": "aimd"})
    ticks: list[TickRecord] = []
    original = c.runtime.controller.on_tick
    assert original is not None

    def record(tick: TickRecord) -> None:
        ticks.append(tick)
        original(tick)

    c.runtime.controller.on_tick = record
    window = c.runtime.gate.window
    # The engine restarts: every counter starts again from (near) zero.
    metrics_fake.preemptions = 0.0
    metrics_fake.prefix_hits = 30.0
    metrics_fake.prefix_queries = 40.0
    scrapes = metrics_fake.metrics_scrapes
    await wait_for(lambda: metrics_fake.metrics_scrapes > scrapes + 3, what="scrapes")
    await wait_for(lambda: len(ticks) > 3, what="ticks")
    fresh = [t for t in ticks if not t.stale]
    assert fresh
    for tick in fresh:
        obs = tick.observation
        assert obs.new_preemptions is None or obs.new_preemptions >= 0, obs
        assert obs.hit_rate is None or 0.0 <= obs.hit_rate <= 1.0, obs
        assert "preempt" not in tick.decision.reason, tick.decision
    # The reset interval counts from zero (Prometheus increase()): 30/40 hits.
    assert any(t.observation.hit_rate == pytest.approx(0.75) for t in fresh)
    assert c.runtime.gate.window == window
    await _step(c, ledger, "after-restart", done=True)
    await assert_invariants(c, ledger)


@pytest.mark.parametrize("mode", ["hold", "closed", "open"])
async def test_failure_modes(
    start_concur: Start, metrics_fake: FakeVLLM, ledger: Ledger, mode: str
) -> None:
    """Stale signal: hold keeps the window, closed admits no one new, open admits all."""
    c = await _start(
        start_concur, metrics_fake, **{"policy.name": "static:2", "control.failure_mode": mode}
    )
    gate = c.runtime.gate
    await _step(c, ledger, "a")  # admitted, keeps its slot between steps
    metrics_fake.metrics_fault = "500"
    status = await _status_until(c, "decision", f"stale:{mode}")
    assert status["failure_mode"] == mode
    expected_window = {"hold": 2, "closed": 1, "open": None}[mode]
    assert status["window"] == expected_window

    new = ["b", "c", "d"]
    tasks = {a: asyncio.create_task(_step(c, ledger, a)) for a in new}
    admitted_now = {"hold": 1, "closed": 0, "open": 3}[mode]
    await wait_for(
        lambda: gate.active == 1 + admitted_now and gate.queued == 3 - admitted_now,
        what=f"{admitted_now} of 3 new agents admitted",
    )
    # An admitted agent is never refused, whatever the mode.
    await _step(c, ledger, "a")

    metrics_fake.metrics_fault = None
    await _recovered(c)
    status = await c.status()
    assert status["window"] == 2
    if mode == "closed":  # the window reopens to 2: one queued agent gets in
        await wait_for(lambda: gate.active == 2 and gate.queued == 2, what="one admitted")
    if mode == "open":  # over-admitted agents keep their slots; new ones queue again
        assert gate.active == 4
        late = asyncio.create_task(_step(c, ledger, "e"))
        await wait_for(lambda: gate.queued == 1, what="e queued")
        tasks["e"] = late
    # Every agent ends; queued ones get in as slots free up.
    pending = {"a", *tasks}
    while pending:
        for agent in sorted(pending):
            task = tasks.get(agent)
            if task is None or task.done():
                if task is not None:
                    await task
                await _step(c, ledger, agent, done=True)
                pending.discard(agent)
        await asyncio.sleep(0.01)
    await assert_invariants(c, ledger)
