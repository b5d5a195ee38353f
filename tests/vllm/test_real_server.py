"""``concur serve`` in front of a real vLLM server, driven with the real ``openai`` client.

Runs only with the vLLM venv: ``make test-vllm`` (``pytest -m vllm``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from fakes.harness import wait_for
from openai import AsyncOpenAI

from concur.adapters.vllm import parse
from concur.app import RUNTIME, Server
from concur.runtime import Runtime
from concur.sim.generate import generate
from concur.sim.realvllm import BLOCK_SIZE, VllmServer
from concur.sim.server.tokenizer import filler_text
from concur.sim.swarm.client import AGENT_HEADER, DONE_HEADER, SwarmOptions, run_swarm

if TYPE_CHECKING:
    from conftest import StartConcur

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODEL_NAME = "concur-tiny"
"""What :class:`~concur.sim.realvllm.VllmServerConfig` serves the model as."""


def runtime(proxy: Server) -> Runtime:
    return proxy.app[RUNTIME]


def _client(base_url: str) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False, timeout=120.0),
    )


async def _chat(
    client: AsyncOpenAI,
    messages: list[dict[str, str]],
    headers: dict[str, str],
    *,
    stream: bool,
    include_usage: bool = True,
    max_tokens: int = 8,
) -> tuple[str, Any, list[Any]]:
    """One chat step; the reply, its usage (None if none came) and the stream's chunks."""
    common: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "extra_headers": headers,
        "extra_body": {"ignore_eos": True, "min_tokens": max_tokens},
    }
    if not stream:
        resp = await client.chat.completions.create(**common)
        return resp.choices[0].message.content or "", resp.usage, []
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = [c async for c in await client.chat.completions.create(**common, stream=True, **extra)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next((c.usage for c in chunks if c.usage is not None), None)
    return text, usage, chunks


async def test_models_are_listed_through_concur(start_concur: StartConcur) -> None:
    proxy = await start_concur()
    async with _client(f"{proxy.url}/v1") as client:
        models = [m.id async for m in client.models.list()]
    assert models == [MODEL_NAME]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
async def test_an_agent_through_concur_hits_its_own_prefix(
    start_concur: StartConcur, stream: bool
) -> None:
    proxy = await start_concur()
    agent = f"agent-{stream}"
    messages = [{"role": "user", "content": filler_text(1500, f"real-{stream}-0")}]
    async with _client(f"{proxy.url}/v1") as client:
        text, first, _ = await _chat(client, messages, {AGENT_HEADER: agent}, stream=stream)
        assert first is not None and first.completion_tokens == 8
        # ~one token per filler word, plus the chat template's few tokens
        assert 1500 <= first.prompt_tokens <= 1500 + 16
        status = (await httpx.AsyncClient().get(f"{proxy.url}/concur/status")).json()
        assert status["active"] == 1
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": filler_text(300, f"real-{stream}-1")},
        ]
        headers = {AGENT_HEADER: agent, DONE_HEADER: "1"}
        _, second, _ = await _chat(client, messages, headers, stream=stream)
    assert second is not None and second.prompt_tokens > first.prompt_tokens + 300
    cached = second.prompt_tokens_details.cached_tokens
    # Every full 128-token block of the first prompt is served from vLLM's prefix cache.
    assert cached % BLOCK_SIZE == 0
    assert cached >= first.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE
    gate = runtime(proxy).gate
    await wait_for(lambda: gate.active == 0, what="the slot freed by the done header")


async def test_usage_is_injected_for_concur_and_stripped_when_the_client_did_not_ask(
    start_concur: StartConcur,
) -> None:
    proxy = await start_concur()
    messages = [{"role": "user", "content": filler_text(700, "real-usage")}]
    async with _client(f"{proxy.url}/v1") as client:
        _, usage, chunks = await _chat(
            client, messages, {AGENT_HEADER: "quiet"}, stream=True, include_usage=False
        )
        assert usage is None
        assert chunks and all(c.usage is None for c in chunks)
        # concur still learned the agent's context from the usage it asked vLLM for.
        agent = runtime(proxy).gate.get("quiet")
        assert agent is not None and 700 + 8 <= agent.context_tokens <= 700 + 8 + 16
        _, usage, chunks = await _chat(client, messages, {AGENT_HEADER: "loud"}, stream=True)
    assert usage is not None and usage.completion_tokens == 8
    assert chunks[-1].usage is not None and not chunks[-1].choices


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
async def test_completions_through_concur(start_concur: StartConcur, stream: bool) -> None:
    proxy = await start_concur()
    async with _client(f"{proxy.url}/v1") as client:
        common: dict[str, Any] = {
            "model": MODEL_NAME,
            "prompt": filler_text(200, "real-completion"),
            "max_tokens": 6,
            "extra_body": {"ignore_eos": True, "min_tokens": 6},
            "extra_headers": {AGENT_HEADER: f"completion-{stream}", DONE_HEADER: "1"},
        }
        if stream:
            chunks = [c async for c in await client.completions.create(**common, stream=True)]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert len(chunks) >= 2  # streamed, not one piece
        else:
            resp = await client.completions.create(**common)
            text = resp.choices[0].text
            assert resp.usage is not None and resp.usage.completion_tokens == 6
    assert text
    gate = runtime(proxy).gate
    await wait_for(lambda: gate.active == 0, what="the slot freed by the done header")


async def _both(
    proxy_url: str, engine_url: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as http:
        via = await http.post(f"{proxy_url}/v1/chat/completions", json=body)
        direct = await http.post(f"{engine_url}/v1/chat/completions", json=body)
    return via, direct


@pytest.mark.parametrize("case", ["unknown_model", "too_long"])
async def test_vllm_errors_pass_through_as_vllm_wrote_them(
    start_concur: StartConcur, vllm_server: VllmServer, case: str
) -> None:
    proxy = await start_concur()
    words = 200 if case == "unknown_model" else vllm_server.config.capacity_tokens + 500
    body = {
        "model": "no-such-model" if case == "unknown_model" else MODEL_NAME,
        "messages": [{"role": "user", "content": filler_text(words, "real-error")}],
        "max_tokens": 4,
    }
    via, direct = await _both(proxy.url, vllm_server.url, body)
    assert via.status_code == direct.status_code == (404 if case == "unknown_model" else 400)
    assert via.json() == direct.json()
    assert via.json()["error"]["message"]  # vLLM's own words, e.g. the context length
    async with _client(f"{proxy.url}/v1") as client:
        expected = openai.NotFoundError if case == "unknown_model" else openai.BadRequestError
        with pytest.raises(expected) as err:
            await client.chat.completions.create(
                model=body["model"], messages=body["messages"], max_tokens=4
            )
    assert err.value.status_code == direct.status_code
    assert direct.json()["error"]["message"] in str(err.value)
    # The failed request of an anonymous client (bypassed, the default) holds nothing.
    gate = runtime(proxy).gate
    await wait_for(lambda: gate.active == 0 and gate.queued == 0, what="no slot held")


async def test_vllm_first_come_first_served_takes_a_priority_and_ignores_it(
    vllm_server: VllmServer,
) -> None:
    """concur stamps agent steps with a priority by default (``admission.engine_priority``
    auto, for vLLM): vLLM's default scheduler must take the field, as the priority one does."""
    assert vllm_server.config.scheduling_policy == "fcfs"
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": filler_text(200, "real-priority")}],
        "max_tokens": 2,
    }
    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as http:
        for priority in (0, 7):
            r = await http.post(
                f"{vllm_server.url}/v1/chat/completions", json={**body, "priority": priority}
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 2
        # The field is vLLM's, checked as such: not an int is refused.
        r = await http.post(
            f"{vllm_server.url}/v1/chat/completions", json={**body, "priority": "high"}
        )
        assert r.status_code == 400


async def test_the_vllm_adapter_reads_the_live_metrics_page(vllm_server: VllmServer) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as http:
        before = parse((await http.get(f"{vllm_server.url}/metrics")).text, time.monotonic())
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": filler_text(1000, "real-adapter")}],
            "max_tokens": 2,
        }
        for _ in range(2):
            assert (await http.post(f"{vllm_server.url}/v1/chat/completions", json=body)).is_success
        after = parse((await http.get(f"{vllm_server.url}/metrics")).text, time.monotonic())
    assert after.kv_capacity_tokens == vllm_server.config.capacity_tokens == 8192
    assert after.engines == 1
    assert after.kv_usage is not None and 0.0 <= after.kv_usage <= 1.0
    assert after.running is not None and after.waiting is not None
    assert before.prefix_queries_total is not None and after.prefix_queries_total is not None
    assert before.prefix_hits_total is not None and after.prefix_hits_total is not None
    queried = after.prefix_queries_total - before.prefix_queries_total
    hit = after.prefix_hits_total - before.prefix_hits_total
    assert queried >= 2 * 1000
    assert hit >= 1000 // BLOCK_SIZE * BLOCK_SIZE  # the second request found the first's blocks
    assert after.preemptions_total is not None and after.preemptions_total >= 0


async def test_concur_polls_the_live_engine(
    start_concur: StartConcur, vllm_server: VllmServer
) -> None:
    proxy = await start_concur()
    rt = runtime(proxy)
    await wait_for(lambda: rt.poller.signal is not None, within=10.0, what="a first signal")
    assert rt.poller.signal is not None
    assert rt.poller.signal.kv_capacity_tokens == vllm_server.config.capacity_tokens
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(f"{proxy.url}/readyz")).status_code == 200


async def test_a_swarm_that_overflows_the_cache_is_held_and_frees_every_slot(
    start_concur: StartConcur,
) -> None:
    # 6 agents whose contexts grow to ~2,600-3,400 tokens each: together ~2.2x the
    # 8,192-token cache, so the cache law (the default started resident) must keep some
    # of them waiting. (The default itself starts open, and a swarm of three steps an
    # agent ends before it has seen the agents wait on the engine for a whole cycle.)
    trace = generate(
        "tiny",
        3,
        agents=6,
        steps=(3, 3),
        first_input_tokens=(1800, 2200),
        input_tokens=(300, 500),
        output_tokens=(16, 24),
        shared_prefix_tokens=0,
        arrival="burst",
        tool_latency_median_s=0.3,
    )
    proxy = await start_concur(
        **{
            "control.interval": 0.25,
            "engine.poll_interval": 0.1,
            "policy.aimd.start_open": False,
        }
    )
    rt = runtime(proxy)
    waiting: list[int] = []

    async def watch() -> None:
        while True:
            waiting.append(rt.gate.queued + rt.gate.paused)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        result = await run_swarm(
            trace, SwarmOptions(base_url=f"{proxy.url}/v1", model=MODEL_NAME, max_retries=0)
        )
    finally:
        watcher.cancel()
    s = result.summary
    assert s.finished_agents == 6 and s.failed_agents == 0, json.dumps(s.errors)
    assert max(waiting) > 0  # concur held agents back
    await wait_for(lambda: rt.gate.active == 0, within=5.0, what="every slot freed")
    assert (rt.gate.active, rt.gate.queued, rt.gate.held) == (0, 0, 0)
