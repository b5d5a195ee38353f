"""One error style everywhere (issue 18, point 6): what the HTTP parser refuses, the
admin API and a busy port answer the way the rest of concur does."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import Concur, Start, assert_openai_error

from concur.app import serve
from concur.config import ConfigError, load_settings

TOKEN = "s3cret-token"


async def raw(c: Concur, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    ("request_bytes", "needle"),
    [
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
            "a header or the request line is longer than the limit 8190 bytes",
        ),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-" + b"b" * 100_000 + b": 1\r\n\r\n",
            "longer than the limit",
        ),
        (b"\x16\x03\x01 not http at all\r\n\r\n", "concur could not read the request"),
    ],
)
async def test_what_the_http_parser_refuses_is_an_openai_error(
    start_concur: Start, fake: FakeVLLM, request_bytes: bytes, needle: str
) -> None:
    c = await start_concur()
    status, headers, body = await raw(c, request_bytes)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert b"bbbbbbbbbb" not in body and b"not http" not in body  # never echoed
    assert len(body) < 400
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["type"] == "invalid_request_error" and err["code"] == "bad_http_request"
    assert needle in err["message"] and "nothing was forwarded" in err["message"]
    assert fake.received == []


async def test_put_policy_words_problems_as_the_config_does(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"server.admin_token": TOKEN})
    payload = {"name": "aimdd", "aimd": {"hihg": 0.9, "low": 7}}
    r = await c.client.put(
        "/concur/policy", json=payload, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    message = assert_openai_error(r, 400)["message"]
    with pytest.raises(ConfigError) as info:
        load_settings(
            env={},
            sets=["policy.name=aimdd", "policy.aimd.hihg=0.9", "policy.aimd.low=7"],
        )
    # Every problem at once, each the loader's line with the source it came from.
    expected = [
        p.replace(" (from --set policy.name)", " (from PUT /concur/policy)")
        .replace("name = aimdd", 'name = "aimdd"')
        .replace(" (from --set policy.aimd.hihg)", " (from PUT /concur/policy)")
        .replace(" (from --set policy.aimd.low)", " (from PUT /concur/policy)")
        for p in info.value.problems
    ]
    assert len(expected) == 3
    assert message == "policy not changed: " + "; ".join(expected)
    assert "Extra inputs are not permitted" not in message


async def test_a_huge_admin_body_is_an_openai_error(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"server.admin_token": TOKEN})
    r = await c.client.put(
        "/concur/policy",
        content=b'{"name": "' + b"x" * (2 << 20) + b'"}',
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    err = assert_openai_error(r, 413)
    assert err["code"] == "request_too_large" and "xxxx" not in err["message"]


async def test_a_busy_port_is_reported_once_before_anything_starts(
    fake: FakeVLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="concur")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = load_settings(env={}, overrides={"upstream.url": fake.url, "server.port": port})
        assert await asyncio.wait_for(serve(settings), 10) == 1
    events = [r.getMessage() for r in caplog.records if r.name.startswith("concur")]
    assert events == ["listen_failed"], events
    (record,) = [r for r in caplog.records if r.getMessage() == "listen_failed"]
    fields = record.__dict__["concur_fields"]
    assert fields["error"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "--listen" in fields["hint"]
