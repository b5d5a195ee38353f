"""``concur engine``'s OpenAI API, through the real ``openai`` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import openai
import pytest

from concur.sim.engine_config import EngineSpec
from concur.sim.server.prompt import chat_overhead
from concur.sim.server.tokenizer import count_tokens, filler_text

if TYPE_CHECKING:
    from conftest import Engine

BS = 16


def sse_events(text: str) -> list[str]:
    return [
        block[len("data: ") :]
        for block in text.replace("\r\n", "\n").split("\n\n")
        if block.startswith("data: ")
    ]


def convo(system_tokens: int = 200, user_tokens: int = 40, seed: int = 0) -> list[Any]:
    return [
        {"role": "system", "content": filler_text(system_tokens, seed=f"sys{seed}")},
        {"role": "user", "content": filler_text(user_tokens, seed=f"user{seed}")},
    ]


async def test_chat_non_streaming(engine: Engine) -> None:
    messages = convo()
    resp = await engine.openai.chat.completions.create(
        model=engine.model, messages=messages, max_tokens=12
    )
    assert resp.object == "chat.completion"
    assert resp.model == engine.model
    assert resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert count_tokens(choice.message.content or "") == 12
    usage = resp.usage
    assert usage is not None
    assert usage.prompt_tokens == 200 + 40 + chat_overhead(2)
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


async def test_chat_streaming_with_usage(engine: Engine) -> None:
    stream = await engine.openai.chat.completions.create(
        model=engine.model,
        messages=convo(),
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish = []
    usages = []
    roles = []
    async for chunk in stream:
        if not chunk.choices:
            usages.append(chunk.usage)
            continue
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        text += delta.content or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert roles[0] == "assistant"
    assert count_tokens(text) == 9
    assert finish == ["length"]
    assert len(usages) == 1 and usages[0] is not None
    assert usages[0].completion_tokens == 9
    assert usages[0].prompt_tokens == 240 + chat_overhead(2)


async def test_raw_stream_ends_with_done_and_has_usage_only_when_asked(engine: Engine) -> None:
    body = {"model": engine.model, "messages": convo(), "max_tokens": 5, "stream": True}
    plain = await engine.http.post("/v1/chat/completions", json=body)
    assert plain.headers["content-type"].startswith("text/event-stream")
    events = sse_events(plain.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)

    body["stream_options"] = {"include_usage": True}
    with_usage = sse_events((await engine.http.post("/v1/chat/completions", json=body)).text)
    last = json.loads(with_usage[-2])
    assert with_usage[-1] == "[DONE]"
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5
    # The same prompt again: its full blocks (all but the last token) hit.
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert last["usage"]["prompt_tokens_details"] == {
        "cached_tokens": (prompt_tokens - 1) // BS * BS
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_that_extends_the_last_one_hits_the_cache(
    engine: Engine, stream: bool
) -> None:
    """Turn 2 re-sends turn 1's prompt and its answer: every full block the engine
    computed for turn 1 (prompt + output - 1 tokens) is served from the cache."""
    messages = convo(seed=int(stream))
    n = 23
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}

    async def ask(msgs: list[Any]) -> tuple[str, Any]:
        if not stream:
            r = await engine.openai.chat.completions.create(
                model=engine.model, messages=msgs, max_tokens=n
            )
            return r.choices[0].message.content or "", r.usage
        s = await engine.openai.chat.completions.create(
            model=engine.model, messages=msgs, max_tokens=n, stream=True, **kwargs
        )
        text, usage = "", None
        async for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            else:
                usage = chunk.usage
        return text, usage

    answer, u1 = await ask(messages)
    p1 = u1.prompt_tokens
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": filler_text(30, seed="next")},
    ]
    _, u2 = await ask(messages)
    assert u2.prompt_tokens == p1 + n + 1 + 32 + 1
    assert u2.prompt_tokens_details.cached_tokens == (p1 + n - 1) // BS * BS
    stats = await engine.stats()
    # Only the last partial block is computed again.
    assert stats["stats"]["recomputed_tokens"] == (p1 + n - 1) % BS


async def test_completions_text_and_token_ids(engine: Engine) -> None:
    text = filler_text(100, seed="c")
    r1 = await engine.openai.completions.create(model=engine.model, prompt=text, max_tokens=7)
    assert r1.object == "text_completion"
    assert r1.choices[0].finish_reason == "length"
    assert count_tokens(r1.choices[0].text) == 7
    assert r1.usage is not None and r1.usage.prompt_tokens == 100

    ids = list(range(1, 301))
    r2 = await engine.openai.completions.create(model=engine.model, prompt=ids, max_tokens=3)
    assert r2.usage is not None and r2.usage.prompt_tokens == 300
    # The same ids extended: the first prompt's full blocks hit.
    stream = await engine.openai.completions.create(
        model=engine.model,
        prompt=[*ids, *range(5000, 5100)],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        else:
            usage = chunk.usage
    assert count_tokens("".join(pieces)) == 4
    assert usage is not None and usage.prompt_tokens == 400
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 300 // BS * BS


async def test_models_and_health(engine: Engine) -> None:
    models = await engine.openai.models.list()
    assert [m.id for m in models.data] == ["concur-sim/llama-3-8b"]
    raw = (await engine.http.get("/v1/models")).json()
    assert raw["data"][0]["max_model_len"] == (50_000 // BS - 1) * BS
    assert (await engine.http.get("/health")).status_code == 200


async def test_model_name_and_default_max_tokens(start_engine: Any) -> None:
    engine = await start_engine(model_name="my/model", default_max_tokens=4)
    r = await engine.openai.chat.completions.create(model="my/model", messages=convo())
    assert r.usage is not None and r.usage.completion_tokens == 4


def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


async def test_errors_name_the_problem(engine: Engine) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await engine.openai.chat.completions.create(model="gpt-4", messages=convo())
    post = engine.http.post
    err = _error(await post("/v1/chat/completions", content=b"{not json"), 400)
    assert "not valid JSON" in err["message"]
    err = _error(await post("/v1/chat/completions", json={"messages": []}), 400)
    assert err["param"] == "messages"
    bad_role = {"messages": [{"role": "robot", "content": "x"}]}
    err = _error(await post("/v1/chat/completions", json=bad_role), 400)
    assert err["param"] == "messages[0].role" and "robot" in err["message"]
    err = _error(await post("/v1/chat/completions", json={"messages": convo(), "n": 2}), 400)
    assert err["param"] == "n"
    zero = {"messages": convo(), "max_tokens": 0}
    assert _error(await post("/v1/chat/completions", json=zero), 400)["param"] == "max_tokens"
    too_long = {"messages": convo(), "max_tokens": 60_000}
    err = _error(await post("/v1/chat/completions", json=too_long), 400)
    assert "maximum context length" in err["message"]
    err = _error(
        await post("/v1/chat/completions", json={"messages": convo(), "priority": "hi"}), 400
    )
    assert err["param"] == "priority"
    batch = {"prompt": ["a", "b"]}
    assert "batched" in _error(await post("/v1/completions", json=batch), 400)["message"]
    assert _error(await post("/v1/completions", json={"prompt": ""}), 400)["param"] == "prompt"
    stats = await engine.stats()
    assert stats["stats"]["requests_added"] == 0  # nothing reached the engine


async def test_chunks_are_coalesced_and_the_end_is_never_held_back(
    start_engine: Any,
) -> None:
    """With a 60 s chunk interval a stream sends its first tokens at once, then
    everything else when the request finishes: not 60 s later."""
    engine = await start_engine(chunk_interval=60.0)
    body = {"model": engine.model, "messages": convo(), "max_tokens": 50, "stream": True}
    resp = await engine.http.post("/v1/chat/completions", json=body, timeout=10.0)
    chunks = [json.loads(e) for e in sse_events(resp.text)[:-1]]
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert 1 <= len(content) <= 2
    assert count_tokens("".join(content)) == 50
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("policy", "first"), [("priority", "C"), ("fcfs", "B")])
async def test_a_priority_engine_serves_the_lowest_priority_first(
    start_engine: Any, policy: str, first: str
) -> None:
    # One request fills the cache at a time: while A runs, B (priority 5) and then C
    # (priority 1) wait; the priority scheduler takes C first, FCFS B.
    spec = EngineSpec(
        model="llama-3-8b", tp=1, kv_capacity_tokens=BS * 80, scheduling_policy=policy
    )
    engine = await start_engine(spec=spec, speed=1.0)
    order: list[str] = []

    async def send(name: str, priority: int, max_tokens: int) -> None:
        body = {
            "messages": convo(700, seed=ord(name)),
            "max_tokens": max_tokens,
            "priority": priority,
        }
        resp = await engine.http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        order.append(name)

    async def added(n: int) -> None:
        for _ in range(1000):
            if (await engine.stats())["stats"]["requests_added"] >= n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"the engine never had {n} requests")

    a = asyncio.create_task(send("A", 0, 150))
    await added(1)
    b = asyncio.create_task(send("B", 5, 5))
    await added(2)
    c = asyncio.create_task(send("C", 1, 5))
    await asyncio.gather(a, b, c)
    assert order == ["A", first, "C" if first == "B" else "B"]
