"""Fault matrix, input side: bad bodies, bad identities, unknown paths, bad configuration.

What concur cannot use it either forwards untouched (the engine is the judge of
its own API) or refuses with a 4xx in OpenAI's shape that says what to fix; it
never answers with a stack trace, and a bad request never takes a slot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, chat
from fakes.invariants import Ledger, assert_invariants, concur_error, raw_request

from concur.cli import main

CHAT = "/v1/chat/completions"


def _post(body: bytes, headers: bytes = b"", content_type: bytes = b"application/json") -> bytes:
    return (
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: concur\r\nConnection: close\r\n"
        b"Content-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + headers
        + b"\r\n"
        + body
    )


# ------------------------------------------------------------------------ bodies


@pytest.mark.parametrize(
    ("label", "body", "content_type"),
    [
        ("malformed JSON", b'{"model": "m", "messages": [', "application/json"),
        ("JSON, not an object", b'["a", "list"]', "application/json"),
        ("not JSON", b"hello, engine", "text/plain"),
        ("binary", bytes(range(256)), "application/octet-stream"),
    ],
)
async def test_bad_bodies_are_forwarded_untouched(
    start_concur: Start,
    fake: FakeVLLM,
    ledger: Ledger,
    label: str,
    body: bytes,
    content_type: str,
) -> None:
    """The engine says what is wrong with a body; concur just relays it (and its answer)."""
    c = await start_concur()
    headers = {"Content-Type": content_type, AGENT: "b", "X-Test-Id": label, **DONE}
    out = await ledger.send(c.client, "POST", CHAT, content=body, headers=headers, label=label)
    assert out.status == 400 and out.relayed, out
    assert out.body == FakeVLLM.error_body(400)  # the engine's own answer
    assert fake.by_id(label).body == body  # byte for byte
    await assert_invariants(c, ledger)


@pytest.mark.parametrize("depth", [100_000, 978])
async def test_absurdly_nested_json_is_forwarded_not_a_crash(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger, depth: int
) -> None:
    """Regression: nesting deep enough to exhaust the recursion limit in parsing (100k) or
    in re-encoding with stream_options (978) used to escape as a bare 500."""
    c = await start_concur()
    content = b"[" * depth + b'"x"' + b"]" * depth
    body = b'{"model":"m","stream":true,"stream_options":{},"messages":[{"content":' + content
    body += b"}]}"
    r = await raw_request(
        ledger, f"depth {depth}", c.server.port, _post(body, f"{AGENT}: deep\r\n".encode())
    )
    assert "x-concur-request-id" in r.headers, r  # relayed: the engine judged it
    received = [s for s in fake.seen if s.path == CHAT]
    assert received[-1].body == body  # forwarded as it came
    out = await ledger.send(
        c.client, "POST", CHAT, json=chat(), headers={AGENT: "deep", **DONE}, label="deep ends"
    )
    assert out.status == 200
    await assert_invariants(c, ledger)


async def test_body_over_the_limit_is_413_and_takes_no_slot(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur(**{"server.max_body_bytes": 4096})
    big = json.dumps(chat("x" * 8000)).encode()
    out = await ledger.send(
        c.client,
        "POST",
        CHAT,
        content=big,
        headers={AGENT: "big", "Content-Type": "application/json"},
    )
    assert out.status == 413
    err = concur_error(out)
    assert err["code"] == "request_too_large" and "4096" in err["message"]

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b"y" * 1000

    out = await ledger.send(c.client, "POST", CHAT, content=chunks(), headers={AGENT: "big2"})
    assert out.status == 413
    assert c.runtime.gate.get("big") is None and c.runtime.gate.get("big2") is None
    assert not [s for s in fake.seen if s.path == CHAT]
    await assert_invariants(c, ledger)


# -------------------------------------------------------------------- identities


@pytest.mark.parametrize(
    ("label", "headers", "body", "says"),
    [
        ("257 bytes", {AGENT: "a" * 257}, {}, "257 bytes"),
        ("multibyte over 256", {AGENT: ("\u00e9" * 129).encode()}, {}, "258 bytes"),
        ("tab inside", {AGENT: "a\tb"}, {}, "control characters"),
        ("C1 control in body session_id", {}, {"session_id": "a\u0085b"}, "control characters"),
        ("NUL in body session_id", {}, {"session_id": "a\u0000b"}, "control characters"),
        ("huge session_id", {}, {"session_id": "s" * 100_000}, "100000 bytes"),
    ],
)
async def test_absurd_identity_is_400_with_a_message(
    start_concur: Start,
    fake: FakeVLLM,
    ledger: Ledger,
    label: str,
    headers: dict[str, str | bytes],
    body: dict[str, str],
    says: str,
) -> None:
    c = await start_concur()
    out = await ledger.send(
        c.client, "POST", CHAT, json=chat(**body), headers={**headers, **DONE}, label=label
    )
    assert out.status == 400, out
    err = concur_error(out)
    assert err["code"] == "invalid_agent_identity"
    assert says in err["message"], err["message"]
    assert "max_identity_bytes" in err["message"] or "printable" in err["message"]
    assert not [s for s in fake.seen if s.path == CHAT]  # never reached the engine
    await assert_invariants(c, ledger)


async def test_control_bytes_in_a_header_are_refused_by_the_http_parser(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    for raw in (b"a\x01b", b"a\x00b", b"a\x7fb"):
        r = await raw_request(
            ledger, repr(raw), c.server.port, _post(b"{}", AGENT.encode() + b": " + raw + b"\r\n")
        )
        assert r.status == 400
    assert not [s for s in fake.seen if s.path == CHAT]
    await assert_invariants(c, ledger)


async def test_missing_or_unusable_identity_is_anonymous(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    """No id (or an empty header, or OpenAI's user field, not an id by default) is an
    anonymous request: it bypasses the gate (admission.anonymous, bypass by default)."""
    c = await start_concur()
    for label, headers, extra in (
        ("no id", {}, {}),
        ("empty header", {AGENT: ""}, {}),
        ("user is a list", {}, {"user": ["a"]}),
        ("user is an object", {}, {"user": {"id": 1}}),
    ):
        out = await ledger.send(
            c.client, "POST", CHAT, json=chat(**extra), headers=headers, label=label
        )
        assert out.status == 200, out
    await assert_invariants(c, ledger)


async def test_unicode_identity_within_the_limit_is_fine(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    agent = "agent-\U0001f916-" + "\u00e9" * 100
    out = await ledger.send(c.client, "POST", CHAT, json=chat(session_id=agent))
    assert out.status == 200
    assert [a["id"] for a in (await c.client.get("/concur/agents")).json()["agents"]] == [agent]
    out = await ledger.send(c.client, "POST", CHAT, json=chat(session_id=agent), headers=DONE)
    assert out.status == 200
    await assert_invariants(c, ledger)


# ------------------------------------------------------------------------- paths


async def test_unknown_paths_pass_through_untouched(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    c = await start_concur()
    targets = [
        ("GET", "/v2/unknown/thing?q=%20x&q=2"),
        ("POST", "/not/a/known/path"),
        ("DELETE", "/v1/files/file-123"),
        ("OPTIONS", "/v1/chat/completions/extra"),
        ("GET", "/v1/a%2Fb/c%20d"),
    ]
    for method, target in targets:
        r = await raw_request(
            ledger,
            f"{method} {target}",
            c.server.port,
            f"{method} {target} HTTP/1.1\r\nHost: concur\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert r.status == 404 and "x-concur-request-id" in r.headers, r  # the engine's 404
    assert fake.received[-len(targets) :] == [t for _, t in targets]
    await assert_invariants(c, ledger)


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("broken.toml", '[upstream\nurl = "http://127.0.0.1:8000"\n', "invalid TOML"),
        ("broken.yaml", "upstream: [\n", "invalid YAML"),
        ("unknown.toml", '[upstream]\nurll = "http://127.0.0.1:1"\n', "upstream.urll"),
        ("section.yaml", "nosuch:\n  x: 1\n", "nosuch"),
        ("value.toml", "[server]\nport = 70000\n", "server.port"),
        ("type.toml", '[control]\ninterval = "soon"\n', "control.interval"),
    ],
)
def test_bad_config_file_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and says in err, err
    assert "Traceback" not in err


def test_unknown_keys_elsewhere_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for argv in (
        ["serve", "--set", "upstream.urll=http://127.0.0.1:1"],
        ["serve", "--config", str(tmp_path / "missing.toml")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "invalid configuration" in err
    monkeypatch.setenv("CONCUR_UPSTREAM__URLL", "http://127.0.0.1:1")
    with pytest.raises(SystemExit) as exc:
        main(["serve"])
    assert exc.value.code == 2
    assert "CONCUR_UPSTREAM__URLL" in capsys.readouterr().err


BAD_POLICIES: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{nope", "bad_json"),
    ("not an object", b'["aimd"]', "bad_policy"),
    ("unknown policy", b'{"name": "nosuch"}', "bad_policy"),
    ("out of range", b'{"name": "aimd", "aimd": {"beta": 7}}', "bad_policy"),
    ("low above high", b'{"name": "aimd", "aimd": {"low": 0.95, "high": 0.5}}', "bad_policy"),
    ("unknown field", b'{"name": "aimd", "aimd": {"betta": 0.5}}', "bad_policy"),
    ("wrong type", b'{"name": "aimd", "aimd": {"alpha": "lots"}}', "bad_policy"),
]


async def test_bad_live_policy_is_rejected_and_old_policy_kept(
    start_concur: Start, fake: FakeVLLM, ledger: Ledger
) -> None:
    token = "t0ken-for-policy-tests"
    c = await start_concur(**{"policy.name": "static:3", "server.admin_token": token})
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    before = (await c.client.get("/concur/policy")).json()
    for label, payload, code in BAD_POLICIES:
        out = await ledger.send(
            c.client, "PUT", "/concur/policy", content=payload, headers=auth, label=label
        )
        assert out.status == 400, out
        err = concur_error(out)
        assert err["code"] == code, (label, err)
        assert (await c.client.get("/concur/policy")).json() == before, label
        assert c.runtime.gate.window == 3
    good = await ledger.send(
        c.client, "PUT", "/concur/policy", json={"name": "static:5"}, headers=auth, label="ok"
    )
    assert good.status == 200
    assert (await c.client.get("/concur/policy")).json()["window"] == 5
    await assert_invariants(c, ledger)
