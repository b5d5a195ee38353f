"""Security: the admin token, where requests can go, what is forwarded, what is trusted.

* admin endpoints need ``Authorization: Bearer <server.admin_token>``, compared in
  constant time, and are disabled (403) without a configured token; the token never
  reaches a log line, a status page or ``config show``;
* the upstream comes only from the configuration: no Host, forwarding header,
  absolute-form target or path trick sends a request anywhere else (a second,
  "evil" server on loopback must see nothing, the configured one everything);
* hop-by-hop and ``Proxy-*`` headers are dropped both ways;
* the default bind is loopback, and listening elsewhere without a token warns;
* request ids are concur's own, never the client's.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, chat
from fakes.invariants import Ledger, assert_invariants, concur_error, raw_request

from concur import _admin
from concur import app as app_module
from concur._listen import ListenError
from concur.cli import main
from concur.config import load_settings
from concur.logs import JsonFormatter, TextFormatter

CHAT = "/v1/chat/completions"
TOKEN = "s3cret-admin-token-6f1c2a9e"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        """Every record in both of concur's formats (all structured fields included)."""
        lines = []
        for fmt in (JsonFormatter(), TextFormatter()):
            lines.extend(fmt.format(r) for r in self.records)
        return "\n".join(lines)


@pytest.fixture
def captured() -> Iterator[_Collect]:
    """Every log record of concur, aiohttp and the root logger, at DEBUG."""
    handler = _Collect()
    names = ("concur", "aiohttp", "")
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture
async def evil() -> AsyncIterator[FakeVLLM]:
    """A server no request may ever reach."""
    async with FakeVLLM() as f:
        yield f


# ------------------------------------------------------------------- admin token


async def test_admin_endpoints_need_the_token(
    start_concur: Start,
    fake: FakeVLLM,
    ledger: Ledger,
    captured: _Collect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(_admin.hmac, "compare_digest", spy)
    c = await start_concur(**{"server.admin_token": TOKEN, "policy.name": "static:2"})
    await ledger.send(c.client, "POST", CHAT, json=chat(), headers={AGENT: "victim"})
    wrong = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": TOKEN},
    ]
    for headers in wrong:
        for method, path, body in (
            ("DELETE", "/concur/agents/victim", None),
            ("PUT", "/concur/policy", {"name": "unlimited"}),
        ):
            out = await ledger.send(c.client, method, path, json=body, headers=headers)
            assert out.status == 401, (headers, out)
            assert concur_error(out)["code"] == "invalid_admin_token"
            assert out.headers["www-authenticate"].startswith("Bearer")
    assert c.runtime.gate.get("victim") is not None
    assert c.runtime.gate.window == 2
    # Every check that got as far as comparing went through hmac.compare_digest.
    assert compared and all(b == TOKEN.encode() for _, b in compared)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    out = await ledger.send(
        c.client, "PUT", "/concur/policy", json={"name": "static:3"}, headers=ok
    )
    assert out.status == 200 and c.runtime.gate.window == 3
    out = await ledger.send(c.client, "DELETE", "/concur/agents/victim", headers=ok)
    assert out.status == 200 and c.runtime.gate.get("victim") is None
    await assert_invariants(c, ledger)
    # The token is nowhere: logs, status, agents, metrics.
    for page in ("/concur/status", "/concur/agents", "/metrics", "/concur/policy"):
        assert TOKEN not in (await c.client.get(page)).text, page
    assert captured.records
    assert TOKEN not in captured.text()


async def test_admin_endpoints_disabled_without_a_token(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    for headers in ({}, {"Authorization": "Bearer anything"}):
        for method, path in (("DELETE", "/concur/agents/x"), ("PUT", "/concur/policy")):
            out = await ledger.send(c.client, method, path, json={}, headers=headers)
            assert out.status == 403
            err = concur_error(out)
            assert err["code"] == "admin_disabled" and "server.admin_token" in err["message"]
    await assert_invariants(c, ledger)


def test_config_show_masks_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", f"server.admin_token={TOKEN}"]) == 0
    out = capsys.readouterr().out
    assert "admin_token" in out and TOKEN not in out


# ------------------------------------------------------------------- upstream


async def test_upstream_comes_only_from_config(
    start_concur: Start, fake: FakeVLLM, evil: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    e = f"127.0.0.1:{evil.port}"
    attempts = [
        # (request target, extra headers, raw path the configured upstream must see)
        ("/echo/h", f"Host: {e}\r\n", "/echo/h"),
        ("/echo/xfh", f"X-Forwarded-Host: {e}\r\nX-Forwarded-Proto: http\r\n", "/echo/xfh"),
        ("/echo/fwd", f"Forwarded: host={e};proto=http\r\n", "/echo/fwd"),
        ("/echo/xhost", f"X-Host: {e}\r\nX-Original-URL: http://{e}/\r\n", "/echo/xhost"),
        (f"http://{e}/echo/abs?a=1", "", "/echo/abs?a=1"),
        (f"//{e}/echo/x", "", f"//{e}/echo/x"),
        (f"/..%2f..%2f{e}/echo/y", "", f"/..%2f..%2f{e}/echo/y"),
        (f"/%2F%2F{e}/echo/z", "", f"/%2F%2F{e}/echo/z"),
        (f"/@{e}/echo/at", "", f"/@{e}/echo/at"),
        (f"/echo/{e}@x/", "", f"/echo/{e}@x/"),
    ]
    for target, headers, seen_as in attempts:
        before = len(fake.received)
        await raw_request(
            ledger,
            target,
            c.server.port,
            f"GET {target} HTTP/1.1\r\nHost: concur\r\n{headers}Connection: close\r\n\r\n".encode()
            if not headers.startswith("Host:")
            else f"GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode(),
        )
        assert fake.received[before:] == [seen_as], (target, fake.received[before:])
    # Gated requests too, with every redirecting header at once.
    sneaky = {"X-Forwarded-Host": e, "Forwarded": f"host={e}", "X-Test-Id": "gated"}
    out = await ledger.send(
        c.client, "POST", CHAT, json=chat(), headers={AGENT: "g", **sneaky, **DONE}
    )
    assert out.status == 200
    host = dict((k.lower(), v) for k, v in fake.by_id("gated").headers)["host"]
    assert host == f"127.0.0.1:{fake.port}"
    assert evil.received == [] and evil.seen == []
    await assert_invariants(c, ledger)
    assert evil.received == []


async def test_hop_by_hop_and_proxy_headers_dropped(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    headers = {
        AGENT: "h",
        "X-Test-Id": "hop",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-T",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "Proxy-Anything": "x",
        "X-Kept": "yes",
        **DONE,
    }
    out = await ledger.send(c.client, "POST", CHAT, json=chat(stream=True), headers=headers)
    assert out.status == 200
    sent = {k.lower() for k, _ in fake.by_id("hop").headers}
    for name in (
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "proxy-anything",
    ):
        assert name not in sent, name
    assert "x-kept" in sent
    out = await ledger.send(c.client, "GET", "/echo/hop?hop=1")
    for name in ("x-hop-secret", "keep-alive", "proxy-authenticate", "proxy-status", "upgrade"):
        assert name not in out.headers, name
    await assert_invariants(c, ledger)


# ---------------------------------------------------------------------- binding


def test_default_bind_is_loopback() -> None:
    settings = load_settings(env={})
    assert settings.server.host == "127.0.0.1"
    assert app_module.is_loopback(settings.server.host)
    for host in ("localhost", "::1", "[::1]", "127.0.0.2"):
        assert app_module.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "concur.example"):
        assert not app_module.is_loopback(host), host


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False)],
)
async def test_binding_beyond_loopback_without_token_warns(
    captured: _Collect,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    token: str | None,
    warned: bool,
) -> None:
    async def refuse(self: app_module.Server) -> None:  # never actually bind
        raise ListenError(98, "test: not binding")

    monkeypatch.setattr(app_module.Server, "start", refuse)
    values: dict[str, object] = {"server.host": host, "server.port": 9}
    if token:
        values["server.admin_token"] = token
    settings = load_settings(overrides=values, env={})
    assert await app_module.serve(settings) == 1
    warnings = [r for r in captured.records if r.getMessage() == "exposed_without_admin_token"]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].levelno == logging.WARNING
        assert "server.admin_token" in captured.text()
    assert not token or token not in captured.text()


# ------------------------------------------------------------------ request ids


async def test_request_ids_are_generated_not_trusted(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger, captured: _Collect
) -> None:
    c = await start_concur()
    client_ids = {"X-Request-Id": "client-chosen-id", "X-Concur-Request-Id": "forged-id"}
    ids = []
    for kwargs in (
        {"json": chat(), "headers": {AGENT: "r", **client_ids}},
        {"json": chat(stream=True), "headers": {AGENT: "r", **client_ids, **DONE}},
        {"json": chat(), "headers": {AGENT: "x" * 300, **client_ids}},  # rejected: 400
    ):
        out = await ledger.send(c.client, "POST", CHAT, **kwargs)
        if out.relayed:
            ids.append(out.headers["x-concur-request-id"])
    assert len(ids) == 2 and len(set(ids)) == 2
    for rid in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    logged = {
        r.__dict__["concur_fields"].get("request_id")
        for r in captured.records
        if isinstance(r.__dict__.get("concur_fields"), dict)
    } - {None}
    assert logged  # the rejection (and DEBUG request lines) carry ids
    assert not logged & {"client-chosen-id", "forged-id"}
    await assert_invariants(c, ledger)
