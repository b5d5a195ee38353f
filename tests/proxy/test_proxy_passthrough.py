"""Passthrough fidelity: methods, paths, queries, bodies, statuses and headers survive."""

from __future__ import annotations

import asyncio

from fakes.fake_vllm import FakeVLLM
from fakes.harness import Start, assert_openai_error


def _headers(seen: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_request_fidelity_and_hop_by_hop_dropped(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    body = bytes(range(256)) * 3  # not UTF-8, not JSON
    resp = await c.client.request(
        "PATCH",
        "/echo/a%2Fb/c%20d?x=1&y=%20z&x=2&empty=",
        content=body,
        headers={
            "Content-Type": "application/octet-stream",
            "X-Custom": "kept",
            "Authorization": "Bearer sk-client",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Proxy-Foo": "bar",
            "Upgrade": "websocket",
            "Host": "evil.example:1234",
            "X-Forwarded-For": "10.1.2.3",
            "X-Test-Id": "fid",
        },
    )
    assert resp.status_code == 200, resp.text
    seen = fake.by_id("fid")
    assert seen.method == "PATCH"
    echoed = resp.json()
    assert echoed["raw_path"] == "/echo/a%2Fb/c%20d?x=1&y=%20z&x=2&empty="
    assert seen.query == "x=1&y=%20z&x=2&empty="
    assert seen.body == body
    h = _headers(seen.headers)
    assert h["x-custom"] == ["kept"]
    assert h["authorization"] == ["Bearer sk-client"]
    assert h["content-type"] == ["application/octet-stream"]
    assert h["content-length"] == [str(len(body))]
    for dropped in ("x-drop-me", "keep-alive", "te", "proxy-authorization", "proxy-foo", "upgrade"):
        assert dropped not in h, dropped
    assert "x-drop-me" not in h.get("connection", [""])[0].lower()
    # The upstream is only ever the configured one, whatever Host the client sent.
    assert h["host"] == [f"127.0.0.1:{fake.port}"]
    assert h["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]


async def test_x_forwarded_for_added(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    resp = await c.client.get("/echo/xff", headers={"X-Test-Id": "xff"})
    assert resp.status_code == 200
    assert _headers(fake.by_id("xff").headers)["x-forwarded-for"] == ["127.0.0.1"]


async def test_response_fidelity(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    resp = await c.client.post("/echo/r?status=201&hop=1", content=b"{}")
    assert resp.status_code == 201
    assert resp.headers["x-echo"] == "yes"
    assert resp.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-concur-request-id"]
    for dropped in ("x-hop-secret", "keep-alive", "proxy-authenticate", "proxy-status", "upgrade"):
        assert dropped not in resp.headers, dropped
    assert "x-hop-secret" not in resp.headers.get("connection", "").lower()
    assert resp.json()["path"] == "/echo/r"


async def test_statuses_redirects_and_empty_bodies(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    for status in (400, 404, 418, 500, 503):
        resp = await c.client.get(f"/echo/s?status={status}")
        assert resp.status_code == status
        assert resp.json()["query"] == f"status={status}"
    resp = await c.client.delete("/echo/s?status=204")
    assert resp.status_code == 204
    assert resp.content == b""
    # A redirect is relayed, not followed.
    resp = await c.client.get("/echo/s?redirect=1")
    assert resp.status_code == 302
    assert resp.headers["location"] == "/elsewhere"
    resp = await c.client.head("/echo/s")
    assert resp.status_code == 200
    assert resp.headers["content-length"] == "42"
    assert resp.content == b""


async def test_non_inference_paths_pass_ungated(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"policy.name": "static:1"})
    # Occupy the only slot: gated requests of a new agent would now queue.
    r = await c.client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Concur-Agent-Id": "holder"},
    )
    assert r.status_code == 200
    models = await c.client.get("/v1/models", headers={"X-Concur-Agent-Id": "other"})
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == "m"
    tok = await c.client.post(
        "/tokenize", json={"model": "m", "prompt": "hello world!"}, headers={"X-Session-Id": "o2"}
    )
    assert tok.status_code == 200
    assert tok.json()["count"] == 3
    # GETs never gate, even on an inference path.
    r = await c.client.get("/v1/chat/completions", headers={"X-Concur-Agent-Id": "o3"})
    assert r.status_code == 405
    assert [a.agent_id for a in c.runtime.gate.agents()] == ["holder"]
    assert c.runtime.gate.queued == 0
    r = await c.client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"X-Concur-Agent-Id": "holder", "X-Concur-Agent-Done": "1"},
    )
    assert r.status_code == 200


async def test_absolute_form_target_cannot_redirect(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
    writer.write(
        b"GET http://evil.invalid/echo/abs?q=1 HTTP/1.1\r\nHost: evil.invalid\r\n"
        b"X-Test-Id: abs\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    seen = fake.by_id("abs")
    assert (seen.path, seen.query) == ("/echo/abs", "q=1")
    assert _headers(seen.headers)["host"] == [f"127.0.0.1:{fake.port}"]


async def test_body_limit(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(**{"server.max_body_bytes": 2048})
    ok = await c.client.post("/echo/small", content=b"x" * 2048)
    assert ok.status_code == 200
    err = assert_openai_error(await c.client.post("/echo/big", content=b"x" * 5000), 413)
    assert "2048" in err["message"]

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b"y" * 1000

    err = assert_openai_error(await c.client.post("/v1/completions", content=chunks()), 413)
    assert err["code"] == "request_too_large"
    assert [s.path for s in fake.seen] == ["/echo/small"]


async def test_unknown_concur_path_is_not_forwarded(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    assert_openai_error(await c.client.get("/concur/nope"), 404)
    assert fake.seen == []


async def test_upstream_url_credentials(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur(upstream=f"http://user:pw@127.0.0.1:{fake.port}")
    await c.client.get("/echo/cred", headers={"X-Test-Id": "c1"})
    await c.client.get("/echo/cred", headers={"X-Test-Id": "c2", "Authorization": "Bearer k"})
    assert _headers(fake.by_id("c1").headers)["authorization"] == ["Basic dXNlcjpwdw=="]
    assert _headers(fake.by_id("c2").headers)["authorization"] == ["Bearer k"]
    status = await c.status()
    assert "pw" not in status["upstream"]
