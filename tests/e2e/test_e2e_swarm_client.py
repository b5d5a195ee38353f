"""``concur swarm``'s client against a recording OpenAI server on loopback: what it sends,
and how it survives failures."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from concur.sim.generate import generate
from concur.sim.procs import free_port
from concur.sim.server.tokenizer import count_tokens
from concur.sim.swarm.client import AGENT_HEADER, DONE_HEADER, SwarmOptions, run_swarm
from concur.sim.trace import Trace

Fault = Callable[[str, int], web.Response | None]
"""(agent id, attempt number of this agent's current step) -> a response to fail with."""


@dataclass
class Recorder:
    """A fake OpenAI server that records every chat request and answers with filler."""

    url: str = ""
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    attempts: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    fault: Fault | None = None
    truncate_once: set[str] = field(default_factory=set)
    released: list[dict[str, Any]] = field(default_factory=list)

    async def release(self, request: web.Request) -> web.Response:
        self.released.append(await request.json())
        return web.json_response({"released": True})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = dict(request.headers)
        agent = headers.get(AGENT_HEADER, "")
        step = sum(1 for m in body["messages"] if m["role"] == "assistant")
        self.attempts[(agent, step)] += 1
        if self.fault is not None:
            failed = self.fault(agent, self.attempts[(agent, step)])
            if failed is not None:
                return failed
        self.requests.append((headers, body))
        n = body["max_tokens"]
        text = " ".join(f"{agent}-s{step}-w{i}" for i in range(n))
        prompt = sum(count_tokens(m["content"]) for m in body["messages"])
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": n,
            "total_tokens": prompt + n,
            "prompt_tokens_details": {"cached_tokens": prompt // 2},
        }
        if not body.get("stream"):
            msg = {"role": "assistant", "content": text}
            return web.json_response(
                {
                    "choices": [{"index": 0, "message": msg, "finish_reason": "length"}],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(data: dict[str, Any]) -> None:
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

        await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == len(words) - 1 else word + " "
            await send({"choices": [{"index": 0, "delta": {"content": piece}}]})
        if agent in self.truncate_once:
            self.truncate_once.discard(agent)
            return resp  # no [DONE]: the stream ends early
        await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        await send({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_get("/v1/models", rec.models)
    app.router.add_post("/v1/chat/completions", rec.chat)
    app.router.add_post("/programs/release", rec.release)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield rec
    await runner.cleanup()


def small_trace(agents: int = 4) -> Trace:
    return generate("tiny", 1, agents=agents)


def options(url: str, **kw: Any) -> SwarmOptions:
    return SwarmOptions(base_url=url, speed=50.0, backoff_s=0.0, **kw)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "plain"])
async def test_agents_send_their_growing_context(recorder: Recorder, stream: bool) -> None:
    trace = small_trace()
    result = await run_swarm(trace, options(recorder.url, stream=stream))

    s = result.summary
    assert s.model == "fake-model"  # discovered from /v1/models
    assert (s.finished_agents, s.failed_agents, s.errors) == (4, 0, {})
    assert s.requests == len(recorder.requests) == trace.total_steps
    assert s.completion_tokens == sum(a.total_output_tokens for a in trace.agents)
    assert s.client_hit_rate is not None and 0.45 < s.client_hit_rate <= 0.5
    by_agent: dict[str, list[tuple[dict[str, str], dict[str, Any]]]] = defaultdict(list)
    for headers, body in recorder.requests:
        by_agent[headers[AGENT_HEADER]].append((headers, body))
    systems = set()
    for agent in trace.agents:
        sent = by_agent[agent.agent_id]
        assert len(sent) == len(agent.steps)
        assert [DONE_HEADER in h for h, _ in sent] == [False] * (len(sent) - 1) + [True]
        prefix = agent.shared_prefix
        assert prefix is not None
        for k, ((_, body), step) in enumerate(zip(sent, agent.steps, strict=True)):
            assert body["max_tokens"] == body["min_tokens"] == step.output_tokens
            assert body["ignore_eos"] is True and body["model"] == "fake-model"
            assert body.get("stream", False) is stream
            if stream:
                assert body["stream_options"] == {"include_usage": True}
            msgs = body["messages"]
            new = step.input_tokens - (prefix.tokens if k == 0 else 0)
            assert msgs[-1]["role"] == "user" and count_tokens(msgs[-1]["content"]) == new
            if k == 0:
                assert msgs[0]["role"] == "system"
                assert count_tokens(msgs[0]["content"]) == prefix.tokens
                systems.add(msgs[0]["content"])
            else:
                # The previous request's messages, then the reply verbatim, then new input.
                before = sent[k - 1][1]["messages"]
                assert msgs[: len(before)] == before
                reply = msgs[len(before)]
                assert reply["role"] == "assistant"
                assert reply["content"] == " ".join(
                    f"{agent.agent_id}-s{k - 1}-w{i}"
                    for i in range(agent.steps[k - 1].output_tokens)
                )
                assert len(msgs) == len(before) + 2
    assert len(systems) == 1  # one shared system prompt, the same text for every agent


async def test_a_body_field_names_the_agent_and_its_end_is_posted(recorder: Recorder) -> None:
    # How ThunderAgent tracks programs: program_id in every body, a release at the end.
    trace = small_trace(3)
    opts = options(recorder.url, agent_field="program_id", release_path="/programs/release")
    result = await run_swarm(trace, opts)
    assert result.summary.finished_agents == 3
    for headers, body in recorder.requests:
        assert body["program_id"] == headers[AGENT_HEADER]
    assert sorted(r["program_id"] for r in recorder.released) == sorted(
        a.agent_id for a in trace.agents
    )
    # Without the field, nothing extra is sent.
    recorder.requests.clear()
    await run_swarm(trace, options(recorder.url))
    assert all("program_id" not in body for _, body in recorder.requests)
    with pytest.raises(ValueError, match="release_path needs agent_field"):
        SwarmOptions("http://h:1", release_path="/programs/release")


async def test_failures_are_retried_counted_and_reported(recorder: Recorder) -> None:
    trace = small_trace()
    ids = [a.agent_id for a in trace.agents]
    flaky, refused, cut = ids[0], ids[1], ids[2]

    def fault(agent: str, attempt: int) -> web.Response | None:
        if agent == flaky and attempt == 1:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if agent == refused:
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        if agent == ids[3] and attempt == 1:
            return web.json_response(
                {"error": {"message": "queue full"}}, status=429, headers={"Retry-After": "0"}
            )
        return None

    recorder.fault = fault
    recorder.truncate_once = {cut}
    result = await run_swarm(trace, options(recorder.url, model="m", max_retries=2))

    s = result.summary
    flaky_steps = len(trace.agents[0].steps)
    last_steps = len(trace.agents[3].steps)
    assert s.errors == {
        "http_5xx": flaky_steps,
        "http_4xx": 1,
        "stream": 1,
        "http_429": last_steps,
    }
    assert (s.finished_agents, s.failed_agents) == (3, 1)
    assert s.retries == flaky_steps + 1 + last_steps
    agents = {a.agent_id: a for a in result.agents}
    assert agents[refused].finished is False and agents[refused].steps_done == 0
    assert agents[refused].error is not None and "HTTP 400: bad request" in agents[refused].error
    assert agents[refused].errors == {"http_4xx": 1}  # a client error is not retried
    assert agents[flaky].finished and agents[flaky].retries == flaky_steps
    assert agents[cut].finished and agents[cut].errors == {"stream": 1}


async def test_a_queue_timeout_is_waited_out_without_using_up_retries(
    recorder: Recorder,
) -> None:
    """concur's 429 queue_timeout (max_queue_wait ran out while the agent waited for a
    slot) is sent again after Retry-After, however often (here 4 times a step, with no
    retries allowed): a batch swarm waits by design."""
    trace = small_trace(1)
    (agent,) = [a.agent_id for a in trace.agents]

    def fault(who: str, attempt: int) -> web.Response | None:
        if who == agent and attempt <= 4:
            body = {"error": {"message": "waited", "type": "rate_limit_error"}}
            body["error"]["code"] = "queue_timeout"
            return web.json_response(body, status=429, headers={"Retry-After": "0"})
        return None

    recorder.fault = fault
    result = await run_swarm(trace, options(recorder.url, model="m", max_retries=0))
    s = result.summary
    assert (s.finished_agents, s.failed_agents) == (1, 0)
    steps = len(trace.agents[0].steps)
    assert s.errors == {"queue_timeout": 4 * steps} and s.retries == 4 * steps


async def test_an_unreachable_server_never_crashes_the_swarm() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    trace = small_trace(3)
    with pytest.raises(ValueError, match="--model"):
        await run_swarm(trace, options(url))
    result = await run_swarm(trace, options(url, model="m", max_retries=1))
    s = result.summary
    assert (s.finished_agents, s.failed_agents) == (0, 3)
    assert s.errors == {"connect": 6}  # each agent's first request, tried twice
    assert all(a.error is not None and a.error.startswith("connect") for a in result.agents)
    assert s.makespan_s == 0.0


def test_options_are_checked() -> None:
    assert SwarmOptions("http://h:1").base_url == "http://h:1/v1"
    assert SwarmOptions("http://h:1/v1/").base_url == "http://h:1/v1"
    with pytest.raises(ValueError, match="base-url"):
        SwarmOptions("h:1")
    with pytest.raises(ValueError, match="speed"):
        SwarmOptions("http://h:1", speed=0)
    with pytest.raises(ValueError, match="concurrency-limit"):
        SwarmOptions("http://h:1", concurrency_limit=0)
