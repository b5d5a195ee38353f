"""A client that goes away aborts its request in the simulated engine; and the
engine's pace follows ``--speed``."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from concur.sim.engine import EngineModel, EngineRequest
from concur.sim.engine_config import EngineSpec
from concur.sim.server.prompt import Message, PromptBuilder
from concur.sim.server.tokenizer import filler_text

if TYPE_CHECKING:
    from conftest import Engine, StartEngine

MESSAGES = [{"role": "user", "content": filler_text(300, seed="abort")}]


async def wait_stats(engine: Engine, pred: Any, what: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while True:
        stats = await engine.stats()
        if pred(stats):
            return stats
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {stats}")
        await asyncio.sleep(0.01)


def freed(stats: dict[str, Any]) -> bool:
    return bool(
        stats["stats"]["requests_aborted"] == 1
        and stats["in_flight"] == 0
        and stats["running"] == 0
        and stats["kv_usage"] == 0.0
    )


async def test_closing_a_stream_aborts_the_request(start_engine: StartEngine) -> None:
    engine = await start_engine(speed=1.0)  # 5,000 tokens take ~40 s: only an abort ends it
    body = {"model": engine.model, "messages": MESSAGES, "max_tokens": 5000, "stream": True}
    async with engine.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        got = 0
        while got < 3:  # the role chunk and two token chunks
            if (await anext(lines)).startswith("data: "):
                got += 1
        running = await engine.stats()
        assert running["running"] == 1 and running["kv_usage"] > 0
    stats = await wait_stats(engine, freed, "the request to be aborted and its blocks freed")
    assert stats["stats"]["requests_finished"] == 0
    text = (await engine.http.get("/metrics")).text
    assert 'finished_reason="abort"' in text
    assert (
        f'vllm:request_success_total{{engine="0",finished_reason="abort",'
        f'model_name="{engine.model}"}} 1.0' in text
    )


async def test_a_client_timeout_aborts_a_non_streaming_request(start_engine: StartEngine) -> None:
    engine = await start_engine(speed=1.0)
    body = {"model": engine.model, "messages": MESSAGES, "max_tokens": 5000}
    with pytest.raises(httpx.ReadTimeout):
        await engine.http.post("/v1/chat/completions", json=body, timeout=0.3)
    await wait_stats(engine, freed, "the request to be aborted and its blocks freed")


async def test_a_request_takes_its_simulated_time_divided_by_speed(
    start_engine: StartEngine,
) -> None:
    """Loose on purpose: at least the scheduled wall time (the loop never delivers
    early), and well under three times it."""
    spec = EngineSpec(model="llama-3-8b", tp=1, kv_capacity_tokens=50_000)
    speed, max_tokens = 5.0, 250
    built = PromptBuilder(16).chat([Message("user", MESSAGES[0]["content"])])
    model = EngineModel(spec.build())
    model.add_request(EngineRequest("x", built.tokens, max_tokens), 0.0)
    t = 0.0
    while model.has_work():
        t = model.step(t).end
    expected_wall = t / speed
    assert 0.2 < expected_wall < 1.0  # the scenario is what the test means it to be

    engine = await start_engine(spec=spec, speed=speed)
    # The client's first request pays for its own warm-up (lazy imports, connection).
    await engine.openai.chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    start = time.monotonic()
    resp = await engine.openai.chat.completions.create(
        model=engine.model, messages=MESSAGES, max_tokens=max_tokens
    )
    wall = time.monotonic() - start
    assert resp.usage is not None and resp.usage.completion_tokens == max_tokens
    assert wall >= expected_wall * 0.99
    assert wall < 3 * expected_wall
