"""Fault injection in ``concur engine``: ``POST /sim/faults`` and start-up faults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from concur.adapters.errors import AdapterError
from concur.adapters.vllm import parse
from concur.sim.server.faults import Faults

if TYPE_CHECKING:
    from conftest import Engine, StartEngine

BODY = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


async def set_faults(engine: Engine, **faults: Any) -> None:
    resp = await engine.http.post("/sim/faults", json=faults)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"metrics": None, "completions": None, **faults}


async def test_metrics_faults(engine: Engine) -> None:
    await set_faults(engine, metrics="500")
    assert (await engine.http.get("/metrics")).status_code == 500

    await set_faults(engine, metrics="garbage")
    resp = await engine.http.get("/metrics")
    assert resp.status_code == 200
    with pytest.raises(AdapterError, match="not a Prometheus text exposition"):
        parse(resp.text, 0.0)

    await set_faults(engine, metrics="missing-kv")
    signal = await engine.signal()
    assert signal.kv_usage is None  # unknown, never 0
    assert signal.running == 0 and signal.kv_capacity_tokens == 50_000

    await set_faults(engine, metrics="timeout")
    with pytest.raises(httpx.ReadTimeout):
        await engine.http.get("/metrics", timeout=0.2)

    await set_faults(engine)  # {} clears everything
    assert (await engine.signal()).kv_usage == 0.0
    assert (await engine.http.get("/sim/faults")).json() == {"metrics": None, "completions": None}


async def test_completion_faults(engine: Engine) -> None:
    await set_faults(engine, completions="500")
    with pytest.raises(openai.InternalServerError):
        await engine.openai.chat.completions.create(model=engine.model, **BODY)

    await set_faults(engine, completions="reset")
    with pytest.raises(httpx.RemoteProtocolError):
        await engine.http.post("/v1/chat/completions", json=BODY)
    with pytest.raises(httpx.RemoteProtocolError):
        await engine.http.post("/v1/completions", json={"prompt": "x"})

    await set_faults(engine, completions="stall")
    with pytest.raises(httpx.ReadTimeout):
        await engine.http.post("/v1/chat/completions", json=BODY, timeout=0.2)
    stream = {**BODY, "stream": True}
    async with engine.http.stream("POST", "/v1/chat/completions", json=stream, timeout=0.3) as resp:
        assert resp.status_code == 200  # headers arrive, then nothing
        with pytest.raises(httpx.ReadTimeout):
            async for _ in resp.aiter_bytes():
                pass

    assert (await engine.stats())["stats"]["requests_added"] == 0  # the engine never saw them
    await set_faults(engine)
    ok = await engine.openai.chat.completions.create(model=engine.model, **BODY)
    assert ok.usage is not None and ok.usage.completion_tokens == 3


async def test_bad_fault_bodies_are_refused(engine: Engine) -> None:
    for body, words in (
        ({"metrics": "explode"}, "faults.metrics must be one of 500, garbage"),
        ({"completions": 500}, "faults.completions must be one of"),
        ({"disk": "full"}, "unknown fault field(s) disk"),
        ([], "must be a JSON object"),
    ):
        resp = await engine.http.post("/sim/faults", json=body)
        assert resp.status_code == 400
        assert words in resp.json()["error"]["message"]


async def test_faults_at_start_up(start_engine: StartEngine) -> None:
    engine = await start_engine(faults=Faults(metrics="500", completions="500"))
    assert (await engine.http.get("/metrics")).status_code == 500
    resp = await engine.http.post("/v1/chat/completions", json=BODY)
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "InternalServerError"
