"""What must hold after every fault case, and a ledger of what the clients saw.

A :class:`Ledger` records every request a test sends and what came back (a
response, or the client-side error when there was none). :func:`assert_invariants`
then checks the four invariants of the reliability suite:

1. every request got exactly one response: the upstream's (relayed, so it carries
   ``X-Concur-Request-Id``), or concur's own error in OpenAI's shape with a reason
   (``error.code``); a request without a response must be one the test ended on
   purpose (a client hang-up, an upstream fault that can only truncate);
2. no admission slot leaks: ``/concur/status`` reaches active = queued = held =
   in-flight = 0;
3. the process keeps serving: a follow-up agent step succeeds;
4. no traceback reaches a client: no response body mentions ``Traceback``.

:func:`raw_exchange` speaks raw bytes on a socket (for requests an HTTP client
refuses to send) and splits what comes back into responses, so a test can count
them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from fakes.harness import AGENT, DONE, Concur, chat

TRACEBACK_MARKERS = ("Traceback", 'File "/')
OWN_PATHS = ("/concur/", "/healthz", "/readyz", "/metrics")


@dataclass
class Outcome:
    """One request as its client saw it."""

    label: str
    status: int | None
    """The HTTP status, or None when no complete response arrived."""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None
    """The client-side exception, when the response did not arrive whole."""
    deliberate: bool = False
    """The test expected no whole response (it hung up, or the fault truncates)."""
    parser_error: bool = False
    """Answered by the HTTP parser itself (a request too malformed to route)."""
    own: bool = False
    """Sent to one of concur's own endpoints (a success there is concur's JSON, not relayed)."""

    @property
    def relayed(self) -> bool:
        return "x-concur-request-id" in self.headers


@dataclass
class Ledger:
    """Every request sent in a case and its :class:`Outcome`."""

    sent: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def begin(self) -> None:
        """Count one request about to be sent (its outcome is added later)."""
        self.sent += 1

    def add(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome

    def response(self, label: str, resp: httpx.Response, body: bytes | None = None) -> Outcome:
        """Record a response (``body``: what a streaming reader collected)."""
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return self.add(
            Outcome(label, resp.status_code, headers, resp.content if body is None else body)
        )

    async def send(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        label: str = "",
        deliberate: bool = False,
        **kwargs: Any,
    ) -> Outcome:
        """Send one request and record its outcome (an httpx error becomes one too)."""
        self.begin()
        try:
            resp = await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            return self.add(
                Outcome(
                    label or url, None, error=f"{type(exc).__name__}: {exc}", deliberate=deliberate
                )
            )
        out = self.response(label or url, resp)
        out.own = url.startswith(OWN_PATHS)
        return out

    async def stream(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        label: str = "",
        deliberate: bool = False,
        stop_after: int | None = None,
        **kwargs: Any,
    ) -> Outcome:
        """Stream one response; with ``stop_after`` bytes, hang up there (deliberately)."""
        self.begin()
        got = bytearray()
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            async with client.stream(method, url, **kwargs) as resp:
                status = resp.status_code
                headers = {k.lower(): v for k, v in resp.headers.items()}
                async for chunk in resp.aiter_raw():
                    got += chunk
                    if stop_after is not None and len(got) >= stop_after:
                        return self.add(
                            Outcome(
                                label or url,
                                None,
                                headers,
                                bytes(got),
                                "client hung up",
                                deliberate=True,
                            )
                        )
        except httpx.HTTPError as exc:
            return self.add(
                Outcome(
                    label or url,
                    None,
                    headers,
                    bytes(got),
                    f"{type(exc).__name__}: {exc} (after HTTP {status})",
                    deliberate=deliberate,
                )
            )
        return self.add(Outcome(label or url, status, headers, bytes(got)))

    def hung_up(self, label: str) -> Outcome:
        """A request the test cancelled on purpose before any response."""
        return self.add(Outcome(label, None, error="client hung up", deliberate=True))

    def statuses(self) -> list[int | None]:
        return [o.status for o in self.outcomes]


def concur_error(outcome: Outcome) -> dict[str, Any]:
    """The ``error`` object of one of concur's own error responses (asserts its shape)."""
    try:
        body = json.loads(outcome.body)
    except ValueError:
        raise AssertionError(
            f"{outcome.label}: HTTP {outcome.status} is neither relayed from the upstream "
            f"nor a JSON error: {outcome.body[:300]!r}"
        ) from None
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), (outcome.label, body)
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "code", "param"}, (outcome.label, err)
    assert err["message"] and err["type"] and err["code"], (outcome.label, err)
    return err


def check_outcome(outcome: Outcome) -> None:
    """One outcome obeys invariants 1 and 4."""
    text = outcome.body.decode("utf-8", "replace")
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, f"{outcome.label}: a traceback reached the client: {text[:500]}"
    if outcome.status is None:
        assert outcome.deliberate, f"{outcome.label}: no response at all ({outcome.error})"
        return
    if outcome.relayed or outcome.parser_error or (outcome.own and outcome.status < 400):
        return
    concur_error(outcome)


async def gate_empty(concur: Concur, within: float = 5.0) -> dict[str, Any]:
    """Wait until ``/concur/status`` shows nothing admitted, queued, held or in flight."""
    last: dict[str, Any] = {}

    async def poll() -> bool:
        nonlocal last
        last = await concur.status()
        return all(last[k] == 0 for k in ("active", "queued", "held", "in_flight"))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await poll():
        if loop.time() > deadline:
            keys = ("active", "live", "paused", "queued", "held", "in_flight")
            raise AssertionError(f"admission slots leaked: { {k: last[k] for k in keys} }")
        await asyncio.sleep(0.02)
    return last


async def assert_invariants(
    concur: Concur, ledger: Ledger | None = None, *, followup: bool = True
) -> None:
    """The four invariants, after a case's agents have all ended (see the module doc).

    ``followup=False`` when the case leaves the upstream down on purpose: then only
    concur's own endpoints must still answer.
    """
    if ledger is not None:
        assert ledger.sent == len(ledger.outcomes), (
            f"{ledger.sent} requests sent, {len(ledger.outcomes)} outcomes recorded"
        )
        for outcome in ledger.outcomes:
            check_outcome(outcome)
    await gate_empty(concur)
    health = await concur.client.get("/healthz")
    assert health.status_code == 200, health.text
    if followup:
        agent = f"followup-{uuid.uuid4().hex[:8]}"
        resp = await concur.client.post(
            "/v1/chat/completions", json=chat("still there?"), headers={AGENT: agent, **DONE}
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers.get("x-concur-request-id"), resp.headers
        assert resp.json()["choices"], resp.text
        await gate_empty(concur)


# ----------------------------------------------------------------- raw sockets


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def split_responses(data: bytes) -> list[RawResponse]:
    """Parse every HTTP/1.x response in ``data`` (Content-Length, chunked or to EOF)."""
    out: list[RawResponse] = []
    rest = data
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, rest = rest[:n], rest[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body_parts = bytearray()
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body_parts += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
            body = bytes(body_parts)
        else:
            body, rest = rest, b""
        out.append(RawResponse(status, headers, body))
    return out


async def raw_exchange(port: int, request: bytes, within: float = 5.0) -> bytes:
    """Send ``request`` as is on a new loopback connection; everything until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


async def raw_request(ledger: Ledger, label: str, port: int, request: bytes) -> RawResponse:
    """One raw request that must get exactly one response; recorded in ``ledger``."""
    ledger.begin()
    responses = split_responses(await raw_exchange(port, request))
    assert len(responses) == 1, f"{label}: {len(responses)} responses: {responses}"
    r = responses[0]
    ledger.add(
        Outcome(
            label,
            r.status,
            r.headers,
            r.body,
            parser_error=r.status == 400
            and "x-concur-request-id" not in r.headers
            and not r.body.startswith(b"{"),
        )
    )
    return r
