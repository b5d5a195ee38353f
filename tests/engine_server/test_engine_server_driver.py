"""The scaled clock and the engine loop of ``concur engine``."""

from __future__ import annotations

import asyncio
import math

import pytest

from concur.sim.blocks import TokenSeq
from concur.sim.engine import EngineModel, EngineRequest
from concur.sim.engine_config import EngineSpec
from concur.sim.scheduler import FinishedRequest
from concur.sim.server.clock import ScaledClock
from concur.sim.server.driver import EngineDriver, EngineStopped

SPEC = EngineSpec(model="llama-3-8b", tp=1, kv_capacity_tokens=8192)


class FakeWall:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def prompt(n: int, seed: int = 0) -> TokenSeq:
    return TokenSeq([tuple(range(seed * 100_000, seed * 100_000 + n))])


# ------------------------------------------------------------------ clock


def test_scaled_clock_maps_wall_to_sim_time_and_back() -> None:
    wall = FakeWall()
    clock = ScaledClock(20.0, wall, start=5.0)
    assert clock.now() == 5.0
    wall.t += 0.5
    assert clock.now() == pytest.approx(15.0)
    assert clock.wall_at(15.0) == pytest.approx(100.5)
    assert clock.wall_at(clock.now()) == pytest.approx(wall.t)
    assert clock.to_wall(2.0) == pytest.approx(0.1)


@pytest.mark.parametrize("speed", [0.0, -1.0, math.inf, math.nan])
def test_scaled_clock_rejects_a_bad_speed(speed: float) -> None:
    with pytest.raises(ValueError, match="speed must be a positive number"):
        ScaledClock(speed, FakeWall())


# ------------------------------------------------------------------ driver


def offline(requests: list[EngineRequest]) -> dict[str, FinishedRequest]:
    """The same requests through a fresh engine in pure virtual time, all at t=0."""
    engine = EngineModel(SPEC.build())
    for req in requests:
        engine.add_request(req, 0.0)
    done: dict[str, FinishedRequest] = {}
    t = 0.0
    while engine.has_work():
        res = engine.step(t)
        t = res.end
        done.update((f.request_id, f) for f in res.finished)
    return done


async def test_streams_get_every_token_in_order_and_match_the_offline_timeline() -> None:
    loop = asyncio.get_running_loop()
    engine = EngineModel(SPEC.build())
    seen: list[str] = []
    driver = EngineDriver(
        engine, ScaledClock(1000.0, loop.time), on_finish=lambda f: seen.append(f.request_id)
    )
    driver.start()
    try:
        reqs = [EngineRequest(f"r{i}", prompt(200 + 50 * i, i), 30 + 10 * i) for i in range(3)]
        streams = [driver.submit(r.request_id, r.prompt, r.max_tokens) for r in reqs]
        assert driver.in_flight == 3

        async def drain(i: int) -> list[int]:
            chunks = []
            while n := await streams[i].next_tokens():
                chunks.append(n)
            return chunks

        chunks = await asyncio.gather(*(drain(i) for i in range(3)))
        for req, got, stream in zip(reqs, chunks, streams, strict=True):
            assert sum(got) == req.max_tokens
            assert stream.finished is not None and stream.done
            assert stream.finished.output_tokens == req.max_tokens
        assert sorted(seen) == ["r0", "r1", "r2"]
        assert driver.in_flight == 0
        assert driver.finished_total == 3
        assert driver.prompt_tokens_total == 200 + 250 + 300
        assert engine.kv_usage == 0.0
        # Submitted together, they run as in the offline simulator: the same steps,
        # so the same times in simulated seconds from the first step on.
        expected = offline(reqs)
        for stream in streams:
            fin = stream.finished
            assert fin is not None
            want = expected[fin.request_id]
            for got_t, want_t in (
                (fin.finish_time, want.finish_time),
                (fin.first_token_time, want.first_token_time),
            ):
                got_d = got_t - fin.first_scheduled_time
                assert got_d == pytest.approx(want_t - want.first_scheduled_time, abs=1e-9)
    finally:
        await driver.stop()


async def test_abort_frees_the_request_and_idle_time_passes() -> None:
    loop = asyncio.get_running_loop()
    engine = EngineModel(SPEC.build())
    driver = EngineDriver(engine, ScaledClock(50.0, loop.time))
    driver.start()
    try:
        stream = driver.submit("long", prompt(500), 2000)
        assert await stream.next_tokens() >= 1
        assert engine.num_running == 1 and engine.kv_usage > 0
        assert driver.abort("long")
        assert not driver.abort("long")
        assert engine.num_running == 0 and engine.kv_usage == 0.0
        assert driver.aborted_total == 1 and driver.in_flight == 0
        with pytest.raises(EngineStopped, match="aborted"):
            await stream.next_tokens()
        # Idle: the engine's time follows the clock again.
        before = driver.now()
        await asyncio.sleep(0.02)
        assert driver.now() > before
        assert driver.lag == 0.0
    finally:
        await driver.stop()


async def test_submit_checks_and_stop_fails_requests_in_flight() -> None:
    loop = asyncio.get_running_loop()
    engine = EngineModel(SPEC.build())
    driver = EngineDriver(engine, ScaledClock(1.0, loop.time))
    with pytest.raises(EngineStopped, match="not running"):
        driver.submit("early", prompt(10), 5)
    driver.start()
    with pytest.raises(ValueError, match="KV blocks"):
        driver.submit("huge", prompt(9000), 5)
    stream = driver.submit("slow", prompt(100), 5000)  # speed 1: takes ~40 s
    await driver.stop()
    assert not driver.healthy
    with pytest.raises(EngineStopped, match="shutting down"):
        await stream.result()
