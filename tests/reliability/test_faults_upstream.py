"""Fault matrix, upstream side: every engine failure becomes exactly one clear answer.

Refused, reset before the headers, reset mid-stream or mid-body, error statuses
with bodies, stalls past the timeouts and very slow streams. After headers are
out, a truncated response is the only honest signal left, so those cases expect
the client to see a cut stream; every other case expects one response.
"""

from __future__ import annotations

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, chat, sse_events, wait_for
from fakes.invariants import Ledger, assert_invariants, concur_error

CHAT = "/v1/chat/completions"


async def test_upstream_refused_then_back(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    await fake.stop()
    for label, kwargs in (
        ("agent step", {"json": chat(), "headers": {AGENT: "r1", **DONE}}),
        ("agent stream", {"json": chat(stream=True), "headers": {AGENT: "r2", **DONE}}),
        ("anonymous", {"json": chat()}),
    ):
        out = await ledger.send(c.client, "POST", CHAT, label=label, **kwargs)
        assert out.status == 502, out
        assert concur_error(out)["code"] == "upstream_unavailable"
    out = await ledger.send(c.client, "GET", "/v1/models", label="ungated")
    assert out.status == 502
    await assert_invariants(c, ledger, followup=False)
    await fake.start()  # the engine is back on the same port
    await assert_invariants(c, ledger)


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_before_headers(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger, stream: bool
) -> None:
    c = await start_concur()
    reset = {"X-Fake-Reset": "headers"}
    body = chat(stream=stream)
    out = await ledger.send(c.client, "POST", CHAT, json=body, headers={AGENT: "a", **reset})
    assert out.status == 502, out
    err = concur_error(out)
    assert err["code"] == "upstream_unavailable" and "retry" in err["message"]
    # The agent keeps its slot after a failed step (it may retry); its last step ends it.
    assert c.runtime.gate.get("a") is not None
    out = await ledger.send(c.client, "POST", CHAT, json=body, headers={AGENT: "a", **DONE})
    assert out.status == 200
    await assert_invariants(c, ledger)


async def test_reset_mid_stream_truncates(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    headers = {AGENT: "m", "X-Fake-Die-After": "2", "X-Fake-Tokens": "6", **DONE}
    out = await ledger.stream(
        c.client, "POST", CHAT, json=chat(stream=True), headers=headers, deliberate=True
    )
    assert out.status is None and "RemoteProtocolError" in (out.error or ""), out
    events = sse_events(out.body.decode())
    assert events and "[DONE]" not in events  # what arrived was relayed, then the cut
    await assert_invariants(c, ledger)


async def test_reset_mid_body_truncates(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    headers = {AGENT: "t", "X-Fake-Truncate": "1", **DONE}
    out = await ledger.send(c.client, "POST", CHAT, json=chat(), headers=headers, deliberate=True)
    assert out.status is None and "RemoteProtocolError" in (out.error or ""), out
    await assert_invariants(c, ledger)


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_error_statuses_pass_through_as_is(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger, status: int, stream: bool
) -> None:
    c = await start_concur()
    headers = {AGENT: "e", "X-Fake-Status": str(status), **DONE}
    out = await ledger.send(c.client, "POST", CHAT, json=chat(stream=stream), headers=headers)
    assert out.status == status
    assert out.relayed
    assert out.body == FakeVLLM.error_body(status)  # byte for byte
    assert out.headers["content-type"].startswith("application/json")
    if status == 503:
        assert out.headers["retry-after"] == "7"
    await assert_invariants(c, ledger)


async def test_stall_before_headers_gives_504(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur(**{"upstream.first_byte_timeout": 0.2})
    headers = {AGENT: "s", "X-Fake-Header-Delay": "30", "X-Test-Id": "stall", **DONE}
    out = await ledger.send(c.client, "POST", CHAT, json=chat(), headers=headers)
    assert out.status == 504
    err = concur_error(out)
    assert err["code"] == "upstream_timeout" and "first_byte_timeout" in err["message"]
    # The abandoned upstream request is cancelled, not left to run.
    await wait_for(lambda: "stall" in fake.cancelled, what="upstream request cancelled")
    await assert_invariants(c, ledger)


async def test_stall_mid_stream_truncates(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur(**{"upstream.read_timeout": 0.2})
    headers = {AGENT: "q", "X-Fake-Delay": "30", "X-Fake-Tokens": "3", "X-Test-Id": "q", **DONE}
    out = await ledger.stream(
        c.client, "POST", CHAT, json=chat(stream=True), headers=headers, deliberate=True
    )
    assert out.status is None and out.body.startswith(b"data: "), out
    await wait_for(lambda: "q" in fake.cancelled, what="upstream request cancelled")
    await assert_invariants(c, ledger)


async def test_very_slow_stream_is_relayed_whole(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    """Each gap is well under read_timeout (4x: a loaded CI box stalls the loop now and
    then), the whole stream is twice as long as either timeout."""
    c = await start_concur(**{"upstream.read_timeout": 0.6, "upstream.first_byte_timeout": 0.6})
    tokens = 8
    headers = {
        AGENT: "slow",
        "X-Fake-Delay": "0.15",
        "X-Fake-Header-Delay": "0.1",
        "X-Fake-Tokens": str(tokens),
        "X-Test-Id": "slow",
        **DONE,
    }
    ledger.begin()
    got = bytearray()
    first_before_end: bool | None = None
    async with c.client.stream("POST", CHAT, json=chat(stream=True), headers=headers) as resp:
        async for chunk in resp.aiter_raw():
            if first_before_end is None:
                first_before_end = not fake.by_id("slow").finished
            got += chunk
    ledger.response("slow stream", resp, bytes(got))
    assert resp.status_code == 200
    assert first_before_end is True  # relayed as it came, not buffered to the end
    events = sse_events(got.decode())
    assert events[-1] == "[DONE]"
    assert sum('"tok' in e for e in events) == tokens
    await assert_invariants(c, ledger)
