"""Agent steps reach the engine with their priority: the steps their agent has done."""

from __future__ import annotations

from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, chat


async def test_each_step_carries_the_steps_its_agent_has_done(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur()
    for k in range(3):
        headers = {AGENT: "p1", "X-Test-Id": f"p1-{k}", **(DONE if k == 2 else {})}
        stream = k == 1  # parsed (stream_options injected) or not: the same priority
        r = await c.client.post("/v1/chat/completions", json=chat(stream=stream), headers=headers)
        assert r.status_code == 200
        assert fake.by_id(f"p1-{k}").json["priority"] == k
    # A second agent starts from the beginning: the late one goes first.
    r = await c.client.post(
        "/v1/completions",
        json={"model": "m", "prompt": "x"},
        headers={AGENT: "p2", "X-Test-Id": "p2-0", **DONE},
    )
    assert r.status_code == 200
    assert fake.by_id("p2-0").json["priority"] == 0


async def test_a_priority_of_the_clients_own_is_kept(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    for k, stream in enumerate((False, True)):
        body = {**chat(stream=stream), "priority": -5}
        headers = {AGENT: "own", "X-Test-Id": f"own-{k}", **(DONE if k else {})}
        r = await c.client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200
        assert fake.by_id(f"own-{k}").json["priority"] == -5


async def test_requests_of_no_agent_are_not_stamped(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"admission.anonymous": "bypass"})
    r = await c.client.post("/v1/chat/completions", json=chat(), headers={"X-Test-Id": "anon"})
    assert r.status_code == 200
    assert "priority" not in fake.by_id("anon").json


async def test_off_sends_none(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"admission.engine_priority": "off"})
    raw = b'{"model": "m", "messages": []}'
    headers = {AGENT: "off", "X-Test-Id": "off", "Content-Type": "application/json", **DONE}
    r = await c.client.post("/v1/chat/completions", content=raw, headers=headers)
    assert r.status_code == 200
    assert fake.by_id("off").body == raw
