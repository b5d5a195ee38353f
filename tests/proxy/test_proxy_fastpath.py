"""The request path's fast paths give the same results as the straightforward code.

:class:`concur.usage.SSEUsage` skips event-by-event parsing for plain chunks and
:func:`concur.usage.encode_with_include_usage` splices ``stream_options`` into the
client's bytes; both are checked here against reference implementations (the
event-by-event splitter the proxy used before, and ``json.dumps``) on generated
streams and bodies, cut into chunks at arbitrary points. So are the cheaper ways to
parse a JSON body (:func:`concur.usage.loads` vs ``json.loads``), to validate an agent
id, to filter hop-by-hop headers, to build the upstream URL and to count upstream
requests for ``/metrics``. The proxy keeps one
timer per request for the first-byte and between-chunks timeouts instead of a timeout
around every read; the last tests check that a slow but steady stream survives it, and
that a read timeout shorter than the first-byte one does not cut the wait for headers.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, Start, chat, sse_events, sse_json
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from yarl import URL

from concur._headers import HOP_BY_HOP, REQUEST_SKIP, filtered, filtered_each, skipped
from concur.admission import AdmissionGate
from concur.deadlines import Deadlines, SendWatch
from concur.identity import IdentityError, IdentitySource, validate
from concur.metrics import LATENCY_BUCKETS, ConcurMetrics, UpstreamStats
from concur.proxy import Proxy, ProxyOptions
from concur.upstream import Upstream
from concur.usage import (
    SSEUsage,
    encode_with_include_usage,
    estimate_prompt_tokens,
    inject_include_usage,
    loads,
    usage_from_object,
)


class ReferenceSSEUsage:
    """The event-by-event splitter, kept as the specification of :class:`SSEUsage`."""

    def __init__(self, *, strip_usage_chunk: bool = False, max_event_bytes: int = 1 << 20) -> None:
        self.strip = strip_usage_chunk
        self.tokens: int | None = None
        self._buf = bytearray()
        self._max = max_event_bytes
        self._overflow = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._overflow:
            return chunk
        self._buf += chunk
        out = bytearray()
        while True:
            end = self._event_end()
            if end is None:
                break
            event = bytes(self._buf[:end])
            del self._buf[:end]
            if self._inspect(event) and self.strip:
                continue
            if self.strip:
                out += event
        if len(self._buf) > self._max:
            self._overflow = True
            if self.strip:
                out += self._buf
            self._buf.clear()
        return chunk if not self.strip else bytes(out)

    def flush(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        if rest and not self._overflow:
            self._inspect(rest)
        return rest if self.strip else b""

    def _event_end(self) -> int | None:
        best: int | None = None
        for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
            i = self._buf.find(sep)
            if i >= 0 and (best is None or i + len(sep) < best):
                best = i + len(sep)
        return best

    def _inspect(self, event: bytes) -> bool:
        if b"usage" not in event:
            return False
        parts = [
            (line[5:][1:] if line[5:].startswith(b" ") else line[5:])
            for line in event.splitlines()
            if line.startswith(b"data:")
        ]
        if not parts:
            return False
        data = b"\n".join(parts)
        if data == b"[DONE]":
            return False
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        tokens = usage_from_object(obj)
        if tokens is None:
            return False
        self.tokens = tokens
        return isinstance(obj, Mapping) and obj.get("choices") == []


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
CHUNK = {"choices": [{"delta": {"content": "usage of tokens"}}]}
PAYLOADS = [
    json.dumps(CHUNK),
    json.dumps({"choices": [{"delta": {"content": "hi"}}]}),
    json.dumps(USAGE),
    json.dumps({"choices": [{"delta": {}}], "usage": {"total_tokens": 5}}),
    "[DONE]",
    "not json usage",
    "",
]
SEPARATORS = [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\n\n", b"\n", b"\r\n\n", b"\n\n\n\n"]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    events = draw(
        st.lists(
            st.tuples(st.sampled_from(PAYLOADS), st.sampled_from(SEPARATORS), st.booleans()),
            max_size=12,
        )
    )
    raw = b"".join(
        (b"data: " if space else b"data:") + p.encode() + sep for p, sep, space in events
    )
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(raw))), max_size=6)))
    return raw, cuts


def _pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def _run(tracker: Any, pieces: list[bytes]) -> tuple[list[bytes], bytes, int | None]:
    outs = [tracker.feed(p) for p in pieces]
    return outs, tracker.flush(), tracker.tokens


@settings(max_examples=150, deadline=None)
@given(streams(), st.booleans(), st.sampled_from([1 << 20, 40]))
def test_sse_usage_matches_reference(
    stream: tuple[bytes, list[int]], strip: bool, max_event: int
) -> None:
    raw, cuts = stream
    pieces = _pieces(raw, cuts)
    fast = _run(SSEUsage(strip_usage_chunk=strip, max_event_bytes=max_event), pieces)
    ref = _run(ReferenceSSEUsage(strip_usage_chunk=strip, max_event_bytes=max_event), pieces)
    assert fast == ref  # the same bytes relayed at the same moments, the same usage
    if not strip:
        assert fast[0] == pieces  # relayed unchanged and at once


@st.composite
def event_chunks(draw: st.DrawFn) -> list[bytes]:
    """Streams cut only between events (how engines write them): each chunk whole events."""
    events = draw(
        st.lists(
            st.tuples(st.sampled_from(PAYLOADS), st.sampled_from(SEPARATORS), st.booleans()),
            min_size=1,
            max_size=8,
        )
    )
    raw = [(b"data: " if space else b"data:") + p.encode() + sep for p, sep, space in events]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(raw)), max_size=4))))
    bounds = [0, *cuts, len(raw)]
    return [b"".join(raw[a:b]) for a, b in itertools.pairwise(bounds)]


_USAGE_EVENT = b"data: " + json.dumps(USAGE).encode() + b"\n\n"


@settings(max_examples=300, deadline=None)
@given(event_chunks(), st.booleans(), st.sampled_from([1 << 20, 40]))
@example([b"data: x\n\n\n" + _USAGE_EVENT], True, 1 << 20)  # a run of newlines before it
@example([b"\n\n" + _USAGE_EVENT + b"data: [DONE]\n\n"], True, 1 << 20)  # a blank first
@example([_USAGE_EVENT + _USAGE_EVENT], True, 1 << 20)  # two usage events in one chunk
def test_sse_usage_whole_event_chunks_match_reference(
    pieces: list[bytes], strip: bool, max_event: int
) -> None:
    # The single-usage-event path of SSEUsage.feed (the final usage chunk, alone or
    # with [DONE]) against the event-by-event splitter.
    fast = _run(SSEUsage(strip_usage_chunk=strip, max_event_bytes=max_event), pieces)
    ref = _run(ReferenceSSEUsage(strip_usage_chunk=strip, max_event_bytes=max_event), pieces)
    assert fast == ref


def test_sse_usage_final_chunk_is_stripped_in_one_piece() -> None:
    usage = b"data: " + json.dumps(USAGE).encode() + b"\n\n"
    for strip in (True, False):
        sse = SSEUsage(strip_usage_chunk=strip)
        chunk = b"data: " + json.dumps(CHUNK).encode() + b"\n\n"
        assert sse.feed(chunk) == chunk
        out = sse.feed(usage + b"data: [DONE]\n\n")
        assert out == (b"data: [DONE]\n\n" if strip else usage + b"data: [DONE]\n\n")
        assert sse.flush() == b""
        assert sse.tokens == 10
        assert sse.stripped == (1 if strip else 0)


def test_sse_usage_plain_chunks_are_relayed_at_once() -> None:
    sse = SSEUsage(strip_usage_chunk=True)
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    assert sse.feed(first) == first
    usage = b"data: " + json.dumps(USAGE).encode() + b"\n\n"
    assert sse.feed(first + usage + b"data: [DONE]\n\n") == first + b"data: [DONE]\n\n"
    assert sse.tokens == 10
    assert sse.flush() == b""


BODIES = st.fixed_dictionaries(
    {"model": st.text(max_size=8), "stream": st.just(True)},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}),
            max_size=3,
        ),
        "temperature": st.floats(0, 2),
        "stream_options": st.dictionaries(
            st.sampled_from(["include_usage", "continuous_usage_stats"]), st.booleans()
        ),
    },
)


@settings(max_examples=100, deadline=None)
@given(BODIES, st.sampled_from(["", " ", "\n  "]), st.booleans())
def test_include_usage_splice_is_the_same_json(
    body: dict[str, Any], lead: str, ascii_only: bool
) -> None:
    raw = (lead + json.dumps(body, ensure_ascii=ascii_only)).encode()
    parsed = json.loads(raw)
    had = "stream_options" in parsed
    if not inject_include_usage("/v1/chat/completions", parsed):
        return
    out = encode_with_include_usage(raw, parsed, had_options=had)
    assert json.loads(out) == parsed
    assert json.loads(out)["stream_options"]["include_usage"] is True


def _reference_chars(value: object) -> int:
    """The estimate's character count as first written, the specification of the fast one."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value) * 4
        return sum(_reference_chars(v) for v in value)
    if isinstance(value, Mapping):
        total = 0
        for key in ("text", "content", "input", "output", "arguments", "refusal"):
            if key in value:
                total += _reference_chars(value[key])
        calls = value.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(fn, Mapping):
                    total += _reference_chars(fn.get("arguments")) + _reference_chars(
                        fn.get("name")
                    )
        return total
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["role", "content", "name", "text", "tool_calls", "function", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(JSON_VALUES, max_size=4), JSON_VALUES)
def test_prompt_estimate_matches_reference(messages: list[Any], prompt: Any) -> None:
    body = {"messages": messages, "prompt": prompt}
    chars = _reference_chars(messages) + _reference_chars(prompt)
    assert estimate_prompt_tokens(body) == (chars + 3) // 4


# ------------------------------------------------------------------ JSON bodies


JSON_TEXTS = st.one_of(
    st.builds(
        json.dumps,
        st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4),
        ensure_ascii=st.booleans(),
    ),
    st.text(alphabet='{}[]":,0123456789 \t\n\rabtrue\\u', max_size=24),
)


@settings(max_examples=300, deadline=None)
@given(JSON_TEXTS, st.sampled_from(["", " ", "\n", " \t\r\n", "x", " }", "\x0b", "{}"]))
def test_loads_is_json_loads(text: str, tail: str) -> None:
    raw = (text + tail).encode("utf-8", "surrogatepass")
    try:
        expected: Any = json.loads(raw)
    except ValueError as exc:
        expected = (type(exc), str(exc))
    try:
        got: Any = loads(raw)
    except ValueError as exc:
        got = (type(exc), str(exc))
    assert got == expected


# ------------------------------------------------------------------ agent ids


def _reference_validate(value: str, source: IdentitySource, max_bytes: int) -> str:
    """The identity check as first written: UTF-8 size, then no control characters."""
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise IdentityError("too long")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise IdentityError("control characters")
    return value


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12), st.integers(1, 12))
def test_identity_fast_check_is_the_full_one(value: str, max_bytes: int) -> None:
    source = IdentitySource("header", "X-Concur-Agent-Id")
    try:
        expected: Any = _reference_validate(value, source, max_bytes)
    except IdentityError:
        expected = IdentityError
    try:
        got: Any = validate(value, source, max_bytes)
    except IdentityError:
        got = IdentityError
    assert got == expected


# --------------------------------------------------------------------- headers

HEADER_NAMES = st.sampled_from(
    [
        "Host",
        "host",
        "Content-Type",
        "Content-Length",
        "Connection",
        "Keep-Alive",
        "TE",
        "Transfer-Encoding",
        "Proxy-Authorization",
        "proxy-connection",
        "Proxy-Foo",
        "X-Proxy-Id",
        "X-Forwarded-For",
        "Authorization",
        "X-Concur-Agent-Id",
        "X-Custom",
        "x-custom",
        "Upgrade",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(HEADER_NAMES, st.sampled_from(["", "1", "x-custom, Close", "a b"]))),
    st.sampled_from([REQUEST_SKIP, HOP_BY_HOP, frozenset()]),
)
def test_header_filter_is_the_header_by_header_one(
    pairs: list[tuple[str, str]], base: frozenset[str]
) -> None:
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    skip = skipped(headers, base)
    fast, each = filtered(headers, skip), filtered_each(headers, skip)
    assert list(fast.items()) == list(each.items())  # the same headers in the same order


# ------------------------------------------------------------------ target URL


def _proxy(upstream: str) -> Proxy:
    gate = AdmissionGate(clock=lambda: 0.0)
    return Proxy(ProxyOptions(upstream=upstream), gate, ConcurMetrics())


@pytest.mark.parametrize("upstream", ["http://engine:8000", "http://u:p@engine/base/"])
@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat/completions",
        "/v1/chat/completions/",
        "/v1/models?x=1&y=%2F",
        "/a%2fb/../c",
        "//evil.example/x",
        "http://evil.example/v1/models?q=1",
        "/",
    ],
)
def test_target_cache_gives_the_computed_target(upstream: str, target: str) -> None:
    proxy = _proxy(upstream)
    request = make_mocked_request("GET", target)
    rel = request.rel_url
    path = rel.raw_path if rel.raw_path.startswith("/") else "/" + rel.raw_path
    query = rel.raw_query_string
    expected = URL(upstream).raw_path.rstrip("/") + path + ("?" + query if query else "")
    first = proxy.forwarder.target(request)
    again = proxy.forwarder.target(make_mocked_request("GET", target))
    assert first == again == expected
    assert first.startswith("/") and "evil" not in first.split("/")[1:2]


async def test_a_header_that_would_break_the_request_framing_is_a_400() -> None:
    # aiohttp's server refuses such headers already; the upstream client checks again.
    proxy = _proxy("http://127.0.0.1:9")
    proxy.upstream = Upstream("http://127.0.0.1:9")
    request = make_mocked_request("GET", "/v1/models", headers={"X-Bad": "a\r\nInjected: 1"})
    resp = await proxy.handle(request)
    assert isinstance(resp, web.Response) and resp.status == 400
    assert resp.body is not None and b"CR or LF" in bytes(resp.body)  # type: ignore[arg-type]


# ------------------------------------------------------------------ timers


async def _stream(c: Any, headers: dict[str, str]) -> str:
    async with c.client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as resp:
        assert resp.status_code == 200
        return (await resp.aread()).decode()


async def test_first_byte_deadline_does_not_cut_the_body(
    start_concur: Start, fake: FakeVLLM
) -> None:
    # Chunks 0.3 s apart: longer than the first-byte timeout, shorter than the read timeout.
    c = await start_concur(**{"upstream.first_byte_timeout": 0.2, "upstream.read_timeout": 2.0})
    body = await _stream(c, {AGENT: "fb", "X-Fake-Delay": "0.3", "X-Fake-Tokens": "3", **DONE})
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    contents = [
        e for e in sse_json(body) if e["choices"] and e["choices"][0]["delta"].get("content")
    ]
    assert len(contents) == 3
    assert fake.cancelled == []


async def test_read_deadline_rearms_while_chunks_keep_coming(
    start_concur: Start, fake: FakeVLLM
) -> None:
    # Each gap (0.2 s) is within the read timeout (0.5 s); the stream as a whole is not.
    c = await start_concur(**{"upstream.first_byte_timeout": 5.0, "upstream.read_timeout": 0.5})
    body = await _stream(c, {AGENT: "ra", "X-Fake-Delay": "0.2", "X-Fake-Tokens": "5", **DONE})
    assert sse_events(body)[-1] == "[DONE]"
    assert fake.cancelled == []


async def test_read_timeout_shorter_than_first_byte_does_not_cut_the_wait(
    start_concur: Start, fake: FakeVLLM
) -> None:
    # Headers after 0.5 s: past the read timeout (0.2 s), within the first-byte one.
    c = await start_concur(**{"upstream.first_byte_timeout": 5.0, "upstream.read_timeout": 0.2})
    headers = {AGENT: "late", "X-Fake-Header-Delay": "0.5", "X-Fake-Tokens": "2", **DONE}
    body = await _stream(c, headers)
    assert sse_events(body)[-1] == "[DONE]"
    assert fake.cancelled == []


async def test_first_byte_deadline_holds_when_read_timeout_is_shorter(
    start_concur: Start, fake: FakeVLLM
) -> None:
    c = await start_concur(**{"upstream.first_byte_timeout": 0.5, "upstream.read_timeout": 0.1})
    headers = {AGENT: "never", "X-Fake-Header-Delay": "30", "X-Test-Id": "never", **DONE}
    resp = await c.client.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "upstream_timeout"


# --------------------------------------------------------------------- metrics


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["200", "500", "error", "timeout", "cancelled"]),
            st.none() | st.floats(0, 1000, allow_nan=False) | st.sampled_from(LATENCY_BUCKETS),
        ),
        max_size=30,
    )
)
def test_upstream_stats_expose_what_counter_and_histogram_would(
    events: list[tuple[str, float | None]],
) -> None:
    fast = CollectorRegistry()
    stats = UpstreamStats()
    fast.register(stats)
    ref = CollectorRegistry()
    counter = Counter(UpstreamStats.REQUESTS, UpstreamStats.REQUESTS_HELP, ["code"], registry=ref)
    histogram = Histogram(
        UpstreamStats.LATENCY, UpstreamStats.LATENCY_HELP, buckets=LATENCY_BUCKETS, registry=ref
    )
    for code, latency in events:
        stats.observe(code, latency)
        counter.labels(code).inc()
        if latency is not None:
            histogram.observe(latency)

    def exposition(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert exposition(fast) == exposition(ref)


class _ManualLoop:
    """Just enough of an event loop for :class:`Deadlines`: a clock moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        loop = self

        class Handle:
            def cancel(self) -> None:
                loop.handles = [h for h in loop.handles if h[1] is not self]

        handle = Handle()
        self.handles.append((when, handle))
        handle.callback = callback  # type: ignore[attr-defined]
        return handle

    def advance(self, to: float) -> None:
        while True:
            due = sorted((h for h in self.handles if h[0] <= to), key=lambda h: h[0])
            if not due:
                break
            when, handle = due[0]
            self.handles.remove((when, handle))
            self.now = max(self.now, when)
            handle.callback()
        self.now = to


class _FakeTimer:
    def __init__(self, deadlines: Deadlines, when: float, fired: list[tuple[float, int]], i: int):
        self.when: float | None = when
        self.deadlines, self.fired, self.i = deadlines, fired, i
        deadlines.add(when, self)  # type: ignore[arg-type]

    def armed_for(self, when: float) -> bool:
        return self.when == when

    def fire(self) -> None:
        assert self.when is not None
        self.fired.append((self.deadlines.loop.time(), self.i))
        self.when = None

    def cancel(self) -> None:
        if self.when is not None:
            self.when = None
            self.deadlines.dropped()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 100), st.booleans(), st.floats(0, 100)), max_size=300),
)
def test_shared_deadlines_fire_each_live_timer_once_at_its_time(
    specs: list[tuple[float, bool, float]],
) -> None:
    loop = _ManualLoop()
    deadlines = Deadlines(loop)  # type: ignore[arg-type]
    fired: list[tuple[float, int]] = []
    timers = []
    # Timers start at increasing instants; some are cancelled at a random later one.
    events = sorted(
        [(i * 0.1, 0, i) for i in range(len(specs))]  # 0: start, 1: cancel
        + [(i * 0.1 + c, 1, i) for i, (_, cancel, c) in enumerate(specs) if cancel]
    )
    for at, kind, i in events:
        loop.advance(at)  # (what is due by then fires first)
        if kind == 0:
            timers.append(_FakeTimer(deadlines, at + specs[i][0], fired, i))
        else:
            timers[i].cancel()
    loop.advance(1000.0)
    by_timer = dict((i, t) for t, i in fired)
    assert len(by_timer) == len(fired)  # once each
    for i, (delay, cancel, cancel_after) in enumerate(specs):
        due = i * 0.1 + delay
        if i in by_timer:
            assert by_timer[i] == due  # at its deadline, not before, not later
            assert not cancel or i * 0.1 + cancel_after >= due
        else:
            assert cancel and i * 0.1 + cancel_after < due
    assert len(deadlines) <= max(130, 2 * sum(1 for t in timers if t.when is not None) + 130)


def test_send_watch_cuts_off_only_a_client_that_read_nothing_for_a_whole_period() -> None:
    loop = _ManualLoop()
    deadlines = Deadlines(loop)  # type: ignore[arg-type]
    stuck: list[float] = []
    unsent = [0]
    watch = SendWatch(deadlines, 10.0, lambda: stuck.append(loop.now), lambda: unsent[0])
    # A slow reader: every write waits, but each one finishes within the period.
    for t in range(1, 60):
        watch.writes += 1
        watch.writing = True
        loop.advance(t - 0.5)
        watch.writing = False
        loop.advance(float(t))
    # Waiting on the upstream (no write under way) for long is not the client's fault.
    loop.advance(100.0)
    assert stuck == []
    # One large write that takes several periods, while the client keeps reading.
    watch.writes += 1
    watch.writing = True
    for t, left in ((110.0, 900_000), (120.0, 600_000), (130.0, 300_000), (140.0, 100_000)):
        unsent[0] = left
        loop.advance(t)
    assert stuck == []
    watch.writing = False
    # A write starting just before a look is not stuck yet at that look...
    loop.advance(149.9)
    watch.writes += 1
    watch.writing = True
    unsent[0] = 500_000
    loop.advance(150.0)
    assert stuck == []
    # ...but when nothing went out by the next one, the client read nothing: cut off, once.
    loop.advance(200.0)
    assert stuck == [160.0]
    watch.cancel()
    assert len(deadlines) <= 1
