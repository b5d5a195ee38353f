"""Pure pieces of the request path: identity, usage, SSE stripping, logs, metrics."""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import replace

import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from concur import logs
from concur._headers import HOP_BY_HOP, skipped
from concur.identity import IdentityError, IdentityExtractor, parse_source
from concur.metrics import ConcurMetrics, GaugeValues, window_direction
from concur.usage import (
    SSEUsage,
    estimate_prompt_tokens,
    inject_include_usage,
    usage_from_json,
    usage_tokens,
)

# ------------------------------------------------------------------ identity


def test_identity_order_and_sources() -> None:
    ex = IdentityExtractor(["header:X-A", "body:session_id", "body:user"], max_bytes=8)
    headers = CIMultiDict({"x-a": " h1 "})
    assert ex.extract(headers, {"user": "u"}) == ("h1", parse_source("header:X-A"))
    assert ex.extract(CIMultiDict(), {"session_id": 7, "user": "u"})[0] == "7"  # type: ignore[index]
    assert ex.extract(CIMultiDict({"X-A": ""}), {"user": "u"})[0] == "u"  # type: ignore[index]
    assert ex.extract(CIMultiDict(), {"user": ["not", "a", "string"]}) is None
    assert ex.extract(CIMultiDict(), None) is None
    assert ex.needs_body


@pytest.mark.parametrize("value", ["x" * 9, "é" * 5, "a\nb", "a\x00", "tab\there", "\x7f"])
def test_identity_rejects(value: str) -> None:
    ex = IdentityExtractor(["body:user"], max_bytes=8)
    with pytest.raises(IdentityError, match="body:user"):
        ex.extract(CIMultiDict(), {"user": value})


@pytest.mark.parametrize("spec", ["cookie:x", "header:", "user", ""])
def test_identity_source_spec_errors(spec: str) -> None:
    with pytest.raises(IdentityError, match="header:<Name>"):
        parse_source(spec)


# -------------------------------------------------------------------- usage


def test_estimate_prompt_tokens() -> None:
    msgs = {
        "messages": [
            {"role": "system", "content": "a" * 40},
            {"role": "user", "content": [{"type": "text", "text": "b" * 40}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "c" * 39}}],
            },
        ]
    }
    assert estimate_prompt_tokens(msgs) == 30
    assert estimate_prompt_tokens({"prompt": "x" * 8}) == 2
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3  # token ids
    assert estimate_prompt_tokens({"prompt": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens({"input": "x" * 12, "instructions": "y" * 4}) == 4
    assert estimate_prompt_tokens({}) == 0


def test_usage_tokens_shapes() -> None:
    assert usage_tokens({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}) == 7
    assert usage_tokens({"input_tokens": 5, "output_tokens": 1}) == 6
    assert usage_tokens({"total_tokens": 9}) == 9
    assert usage_tokens({"prompt_tokens": 4}) == 4
    assert usage_tokens(None) is None
    assert usage_tokens({}) is None
    assert usage_from_json(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}') == 2
    assert usage_from_json(b'{"id": 1}') is None
    assert usage_from_json(b'{"usage": bad') is None


def test_inject_include_usage() -> None:
    body: dict[str, object] = {"stream": True}
    assert inject_include_usage("/v1/chat/completions", body)
    assert body["stream_options"] == {"include_usage": True}
    body = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert inject_include_usage("/v1/completions", body)
    assert body["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    for path, b in (
        ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"stream": False}),
        ("/v1/chat/completions", {}),
        ("/v1/responses", {"stream": True}),
        ("/v1/chat/completions", {"stream": True, "stream_options": "bad"}),
    ):
        before = json.dumps(b)
        assert not inject_include_usage(path, b)
        assert json.dumps(b) == before


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CHUNK = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"id": "c", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
STREAM = _event(CHUNK) + _event(CHUNK) + _event(USAGE) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 3, 7, 50, len(STREAM)])
def test_sse_strip_any_chunking(size: int) -> None:
    sse = SSEUsage(strip_usage_chunk=True)
    out = b"".join(sse.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    out += sse.flush()
    assert out == _event(CHUNK) + _event(CHUNK) + b"data: [DONE]\n\n"
    assert sse.tokens == 12 and sse.stripped == 1


def test_sse_passthrough_relays_every_chunk_unchanged() -> None:
    sse = SSEUsage()
    pieces = [STREAM[:5], STREAM[5:60], STREAM[60:]]
    assert [sse.feed(p) for p in pieces] == pieces
    assert sse.flush() == b""
    assert sse.tokens == 12


def test_sse_crlf_and_multiline_data_and_responses_api() -> None:
    usage = {"input_tokens": 3, "output_tokens": 4}
    completed = {"type": "response.completed", "response": {"usage": usage}}
    raw = b"event: response.completed\r\ndata: " + json.dumps(completed).encode() + b"\r\n\r\n"
    sse = SSEUsage(strip_usage_chunk=True)
    assert sse.feed(raw) == raw  # not a usage-only chat chunk: kept
    assert sse.tokens == 7
    text = json.dumps(USAGE).encode()
    cut = text.index(b",") + 1  # a newline between JSON tokens is whitespace
    multi = b"data: " + text[:cut] + b"\ndata: " + text[cut:] + b"\n\n"
    sse = SSEUsage(strip_usage_chunk=True)
    assert sse.feed(multi) == b""
    assert sse.tokens == 12


def test_sse_unterminated_tail_is_flushed() -> None:
    sse = SSEUsage(strip_usage_chunk=True)
    assert sse.feed(b"data: partial") == b""
    assert sse.flush() == b"data: partial"


def test_sse_oversized_event_stops_inspection() -> None:
    sse = SSEUsage(strip_usage_chunk=True, max_event_bytes=10)
    assert sse.feed(b"data: " + b"x" * 20) == b"data: " + b"x" * 20
    assert sse.feed(_event(USAGE)) == _event(USAGE)


# ---------------------------------------------------------------- headers


def test_hop_by_hop_includes_connection_tokens() -> None:
    headers = CIMultiDict([("Connection", "close, X-Foo"), ("Connection", "x-bar")])
    names = skipped(headers, HOP_BY_HOP)
    assert {"x-foo", "x-bar", "close", "keep-alive", "transfer-encoding", "te"} <= names


# -------------------------------------------------------------------- logs


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_formats(fmt: str) -> None:
    stream = io.StringIO()
    handler = logs.setup_logging(fmt, "info", stream)  # type: ignore[arg-type]
    try:
        log = logging.getLogger("concur.test")
        logs.event(log, "admission", outcome="admitted", agent="a b", waited=0.1234567)
        logs.event(log, "hidden", logging.DEBUG, x=1)
        line = stream.getvalue().strip()
        assert "\n" not in line and "hidden" not in line
        if fmt == "json":
            rec = json.loads(line)
            assert rec["event"] == "admission" and rec["agent"] == "a b"
            assert rec["level"] == "info" and rec["waited"] == 0.123457
        else:
            assert 'admission outcome=admitted agent="a b" waited=0.123457' in line
    finally:
        for name in ("concur", "aiohttp"):
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)


def test_window_direction() -> None:
    assert window_direction(4, 2) == "down"
    assert window_direction(2, 4) == "up"
    assert window_direction(None, 4) == "down"
    assert window_direction(4, None) == "up"
    assert window_direction(3, 3) is None
    assert window_direction(None, None) is None


def test_pressure_parts_follow_the_last_tick() -> None:
    def parts(m: ConcurMetrics) -> dict[str, float]:
        text = m.render()[0].decode()
        return {
            s.labels["source"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "concur_pressure_part"
        }

    m = ConcurMetrics()
    base = GaugeValues(
        window=4, active=2, live=2, paused=0, queued=0, pressure=0.7,
        kv_usage=0.7, hit_rate=None, signal_age=0.1,
    )  # fmt: skip
    assert parts(m) == {}  # before the first tick with a signal
    m.update(replace(base, parts={"kv": 0.7, "working_set": 0.4, "projected": None}))
    got = parts(m)
    assert got.keys() == {"kv", "working_set", "projected"} and math.isnan(got.pop("projected"))
    assert got == {"kv": 0.7, "working_set": 0.4}
    m.update(replace(base, parts={"kv": 0.5}))  # policy retuned to read KV only
    assert parts(m) == {"kv": 0.5}
