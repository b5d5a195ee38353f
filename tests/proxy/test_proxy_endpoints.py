"""concur's own endpoints: status, agents, metrics, health, readiness, admin."""

from __future__ import annotations

import logging
import math

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, assert_openai_error, chat, wait_for
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "s3cret-admin-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_match_status(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:2", "admission.max_queue_wait": 0.2})
    fake.kv_usage = 0.42
    await c.wait_fresh()
    await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "a"})
    await c.client.post("/v1/chat/completions", json=chat(stream=True), headers={AGENT: "b"})
    r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "c"})
    assert r.status_code == 429
    await c.client.get("/v1/models")
    await wait_for(lambda: c.runtime.poller.signal is not None, what="signal")

    status = await c.status()
    resp = await c.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    m = samples(resp.text)

    def one(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert one("concur_window") == status["window"] == 2
    assert one("concur_agents_active") == status["active"] == 2
    assert one("concur_agents_live") == status["live"] == 2
    assert one("concur_agents_paused") == status["paused"] == 0
    assert one("concur_agents_queued") == status["queued"] == 0
    assert one("concur_engine_kv_usage") == status["signal"]["kv_usage"] == 0.42
    assert one("concur_pressure") == pytest.approx(status["pressure"])
    assert status["pressure"] == pytest.approx(0.42)
    assert set(status["pressure_parts"]) >= {"kv", "working_set"}
    parts = {dict(k[1])["source"]: v for k, v in m.items() if k[0] == "concur_pressure_part"}
    assert set(parts) == set(status["pressure_parts"])
    for source, value in status["pressure_parts"].items():
        got = parts[source]
        assert math.isnan(got) if value is None else got == pytest.approx(value), source
    assert parts["kv"] == pytest.approx(0.42)
    assert one("concur_signal_age_seconds") >= 0
    assert status["signal_age_seconds"] < 1.0 and status["stale"] is False
    assert status["policy"] == {"name": "static", "window": 2}
    assert status["failure_mode"] == "hold"
    assert one("concur_admissions_total", outcome="admitted") == 2
    assert one("concur_admissions_total", outcome="queued") == 1
    assert one("concur_admissions_total", outcome="timeout") == 1
    assert one("concur_upstream_requests_total", code="200") == 3
    assert one("concur_queue_wait_seconds_count") == 2
    assert one("concur_upstream_latency_seconds_count") == 3
    assert ("concur_window_changes_total", (("direction", "down"),)) in m
    assert not math.isnan(one("concur_engine_hit_rate")) or status["hit_rate"] is None
    assert not any(name.endswith("_created") for name, _ in m)
    for agent in ("a", "b"):
        await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: agent, **DONE})


async def test_window_changes_are_counted(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(
        **{
            "policy.name": "aimd",
            "policy.aimd.initial_window": 8,
            "policy.aimd.start_open": False,
            "policy.aimd.decrease_cooldown": 0,
        }
    )
    fake.kv_usage = 0.95
    await wait_for(lambda: c.runtime.gate.window == 1, what="window down to 1")
    m = samples((await c.client.get("/metrics")).text)
    assert m[("concur_window_changes_total", (("direction", "down"),))] == 3  # 8 -> 4 -> 2 -> 1
    assert m[("concur_window", ())] == 1


async def test_health_and_readiness(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    assert (await c.client.get("/healthz")).json() == {"status": "ok"}
    await c.wait_fresh()
    r = await c.client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True}
    await fake.stop()  # the engine goes away: no fresh signal, no upstream
    await wait_for(lambda: c.runtime.poller.is_stale(), within=3.0, what="stale signal")
    r = await c.client.get("/readyz")
    assert r.status_code == 503
    reasons = " ".join(r.json()["reasons"])
    assert "stale" in reasons and "unreachable" in reasons
    assert (await c.client.get("/healthz")).status_code == 200


async def test_admin_disabled_without_token(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    r = await c.client.put("/concur/policy", json={"name": "static:3"})
    assert assert_openai_error(r, 403)["code"] == "admin_disabled"
    r = await c.client.delete("/concur/agents/x", headers={"Authorization": "Bearer anything"})
    assert_openai_error(r, 403)
    assert (await c.status())["policy"]["name"] == "static"


async def test_admin_token(
    start_concur: Start, fake: FakeVLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = await start_concur(**{"server.admin_token": TOKEN, "policy.name": "static:1"})
    good = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = await c.client.put("/concur/policy", json={"name": "static:3"}, headers=headers)
        assert_openai_error(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert_openai_error(await c.client.delete("/concur/agents/a", headers=headers), 401)

    # Bad payloads: 400 with the reason, and the old policy stays.
    for payload, needle in (
        ({"name": "bogus"}, "unknown policy"),
        ({"name": "aimd", "aimd": {"high": 2}}, "aimd.high"),
        ({"name": "aimd", "aimd": {"low": 0.95}}, "low"),
        ({"nmae": "aimd"}, "nmae"),
        (["aimd"], "JSON object"),
    ):
        r = await c.client.put("/concur/policy", json=payload, headers=good)
        err = assert_openai_error(r, 400)
        assert needle in err["message"], err["message"]
        assert (await c.status())["policy"] == {"name": "static", "window": 1}
    r = await c.client.put("/concur/policy", content=b"{nope", headers=good)
    assert_openai_error(r, 400)

    r = await c.client.put(
        "/concur/policy", json={"name": "aimd", "aimd": {"high": 0.9}}, headers=good
    )
    assert r.status_code == 200, r.text
    policy = (await c.status())["policy"]
    assert policy["name"] == "aimd" and policy["high"] == 0.9 and policy["low"] == 0.75
    # A second PUT merges into the current settings.
    r = await c.client.put("/concur/policy", json={"aimd": {"alpha": 2}}, headers=good)
    policy = r.json()["policy"]
    assert (policy["high"], policy["alpha"]) == (0.9, 2)

    # DELETE an agent: it ends and its slot is free.
    assert (
        await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "a/b c"})
    ).status_code == 200
    assert_openai_error(await c.client.delete("/concur/agents/nobody", headers=good), 404)
    r = await c.client.delete("/concur/agents/a%2Fb%20c", headers=good)
    assert r.status_code == 200 and r.json() == {"ended": "a/b c"}
    assert c.runtime.gate.active == 0
    # The token is never logged.
    assert TOKEN not in caplog.text
    assert all(TOKEN not in str(getattr(rec, "concur_fields", "")) for rec in caplog.records)


async def test_status_and_agents_shape(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    await c.wait_fresh()
    status = await c.status()
    for key in (
        "window",
        "active",
        "live",
        "paused",
        "queued",
        "pressure",
        "pressure_parts",
        "signal",
        "signal_age_seconds",
        "stale",
        "policy",
        "failure_mode",
    ):
        assert key in status, key
    assert status["signal"]["kv_capacity_tokens"] == fake.num_gpu_blocks * fake.block_size
    assert (await c.client.get("/concur/agents")).json() == {"agents": []}
    r = await c.client.get("/concur/policy")
    assert r.json()["policy"] == {"name": "static", "window": 4}
