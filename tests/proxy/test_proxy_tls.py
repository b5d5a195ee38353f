"""An https engine signed by a private CA: trusted through ``upstream.ca_file``, refused without."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, FAST, Start, assert_openai_error, chat, concur_starter
from fakes.harness import sse_events as events


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "engine-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield str(path)


@pytest.fixture
async def tls_fake(ca: trustme.CA) -> AsyncIterator[FakeVLLM]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    async with FakeVLLM(tls=server) as f:
        yield f


@pytest.fixture
async def start_tls(tls_fake: FakeVLLM) -> AsyncIterator[Start]:
    async with concur_starter(tls_fake.url, FAST) as start:
        yield start


async def test_private_ca_engine_is_proxied_and_polled(
    start_tls: Start, tls_fake: FakeVLLM, ca_file: str
) -> None:
    assert tls_fake.url.startswith("https://")
    c = await start_tls(**{"upstream.ca_file": ca_file})
    await c.wait_fresh()  # /metrics scraped over TLS
    assert (await c.client.get("/readyz")).status_code == 200

    r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "a"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0
    async with c.client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True), headers={AGENT: "a", **DONE}
    ) as s:
        body = (await s.aread()).decode()
    assert s.status_code == 200 and events(body)[-1] == "[DONE]"
    assert [x.path for x in tls_fake.seen if x.path.startswith("/v1/")] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
    ]


async def test_untrusted_engine_certificate_is_a_502_that_says_why(
    start_tls: Start, tls_fake: FakeVLLM
) -> None:
    c = await start_tls()  # no upstream.ca_file: the system's CAs do not know this one
    r = await c.client.post("/v1/chat/completions", json=chat(), headers={AGENT: "u", **DONE})
    err = assert_openai_error(r, 502)
    assert "CERTIFICATE_VERIFY_FAILED" in err["message"]
    assert not [x for x in tls_fake.seen if x.path.startswith("/v1/")]
    status = await c.status()
    assert status["signal"] is None and "CERTIFICATE_VERIFY_FAILED" in status["poll_error"]
    r = await c.client.get("/readyz")
    assert r.status_code == 503 and "no engine signal" in " ".join(r.json()["reasons"])
