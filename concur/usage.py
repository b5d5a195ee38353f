"""Token accounting on the request path: estimates, usage extraction, ``stream_options``.

concur needs each agent's context size (prompt + completion tokens) for its
working-set pressure. Before a request runs it estimates the prompt from the
body (about four characters per token). After the response it reads the
engine's own ``usage``: from the JSON body, or from a streamed response's
final usage chunk. A streaming chat or completion request that did not ask for
usage gets ``stream_options.include_usage = true`` injected, and the usage-only
chunk that this produces is stripped from the relayed stream, so the client
sees exactly the events it asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

CHARS_PER_TOKEN = 4
STREAM_OPTIONS_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""Paths whose streaming requests accept ``stream_options`` (the Responses API always
reports usage in its ``response.completed`` event)."""


# ------------------------------------------------------------------ estimates


_TEXT_KEYS = ("text", "content", "input", "output", "arguments", "refusal")
_MAPPINGS = (dict, Mapping)  # dict first: parsed JSON is made of dicts, checked fast
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "name"})
"""A message with only these keys and string content counts exactly its content."""


def _text_chars(value: object) -> int:
    """Characters of text in a message content / prompt / input value, recursively."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        if (
            value
            and isinstance(value[0], int)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            return len(value) * CHARS_PER_TOKEN  # a pre-tokenized prompt: one token each
        total = 0
        for v in value:
            if (
                type(v) is dict
                and type(content := v.get("content")) is str
                and v.keys() <= _PLAIN_MESSAGE_KEYS
            ):
                total += len(content)  # the common chat message, without a call
            else:
                total += _text_chars(v)
        return total
    if isinstance(value, _MAPPINGS):
        total = 0
        for key in _TEXT_KEYS:
            if key in value:
                total += _text_chars(value[key])
        calls = value.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, _MAPPINGS) else None
                if isinstance(fn, _MAPPINGS):
                    total += _text_chars(fn.get("arguments")) + _text_chars(fn.get("name"))
        return total
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """A rough prompt size in tokens: characters / 4 of messages, prompt or input."""
    chars = 0
    for key in ("messages", "prompt", "input", "instructions"):
        if key in body:
            chars += _text_chars(body[key])
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(json.dumps(tools, separators=(",", ":"), default=str))
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


# -------------------------------------------------------------------- usage


def usage_tokens(usage: object) -> int | None:
    """prompt + completion tokens from an OpenAI ``usage`` object (or the Responses API's
    input + output tokens); ``None`` when it carries neither."""
    if not isinstance(usage, _MAPPINGS):
        return None
    for a, b in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        pa, pb = usage.get(a), usage.get(b)
        if isinstance(pa, int) and not isinstance(pa, bool):
            return pa + (pb if isinstance(pb, int) and not isinstance(pb, bool) else 0)
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    return None


def usage_from_object(obj: object) -> int | None:
    """Usage tokens of a response object or stream event (chat, completion, Responses)."""
    if not isinstance(obj, _MAPPINGS):
        return None
    found = usage_tokens(obj.get("usage"))
    if found is None:
        inner = obj.get("response")  # Responses API: response.completed event
        if isinstance(inner, _MAPPINGS):
            found = usage_tokens(inner.get("usage"))
    return found


_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_WHITESPACE = " \t\n\r"


def loads(data: bytes) -> Any:
    """``json.loads(data)``, skipping its encoding detection for the usual UTF-8 object.

    ``json.loads`` reads bytes starting ``{`` and a non-NUL byte as UTF-8 (with
    ``surrogatepass``); such bytes are decoded here directly and handed to the
    decoder's C scanner, which is what ``json.loads`` ends up calling, without its
    two whitespace regex matches. Whatever that path does not accept whole (an error,
    trailing data) goes through ``json.loads``, for the same result or the same
    ``ValueError``.
    """
    if data[:1] == b"{" and data[1:2] != b"\x00":
        text = data.decode("utf-8", "surrogatepass")
        try:
            obj, end = _scan_once(text, 0)
        except StopIteration:
            return json.loads(text)  # raises its JSONDecodeError
        if end == len(text) or not text[end:].strip(_JSON_WHITESPACE):
            return obj
        return json.loads(text)
    return json.loads(data)


def usage_from_json(body: bytes) -> int | None:
    """Usage tokens of a non-streaming JSON response body, if it has any."""
    if b'"usage"' not in body:
        return None
    try:
        obj = loads(body)
    except ValueError:
        return None
    return usage_from_object(obj)


# ------------------------------------------------------------ stream_options


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'
JSON_WHITESPACE = b" \t\r\n"


def skip_space(raw: bytes, i: int = 0) -> int:
    """The index of the first byte at or after ``i`` that is not JSON whitespace."""
    n = len(raw)
    while i < n and raw[i] in JSON_WHITESPACE:
        i += 1
    return i


def splice_member(raw: bytes, member: bytes) -> bytes | None:
    """``raw``, the bytes of a JSON object, with ``member`` (``"key":value``) first and
    every other byte as the client wrote it (nothing re-serialized); ``None`` when
    ``raw`` does not open an object."""
    if raw[:1] == b"{":
        start = 0  # the usual case: no leading whitespace
    else:
        start = skip_space(raw)
        if raw[start : start + 1] != b"{":
            return None
    first = skip_space(raw, start + 1)
    comma = b"" if raw[first : first + 1] == b"}" else b","
    return b"".join((raw[:start], b"{", member, comma, memoryview(raw)[start + 1 :]))


def encode_with_include_usage(raw: bytes, body: Mapping[str, Any], *, had_options: bool) -> bytes:
    """The request body to send after :func:`inject_include_usage` changed ``body``.

    When the client sent no ``stream_options``, the member is spliced in front of
    the client's own bytes (:func:`splice_member`); otherwise ``body`` is re-encoded.
    """
    if not had_options and (spliced := splice_member(raw, _INCLUDE_USAGE)) is not None:
        return spliced
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def wants_stream(body: Mapping[str, Any]) -> bool:
    return body.get("stream") is True


def inject_include_usage(path: str, body: dict[str, Any]) -> bool:
    """Ask for usage in a streaming chat/completions request that did not.

    Mutates ``body`` and returns True when it injected (so the proxy strips the
    usage-only chunk); False when the client already asked, the request does not
    stream, or the path takes no ``stream_options``.
    """
    if path not in STREAM_OPTIONS_PATHS or not wants_stream(body):
        return False
    opts = body.get("stream_options")
    if opts is None:
        opts = {}
    elif not isinstance(opts, dict):
        return False  # malformed: leave it for the engine to reject
    if opts.get("include_usage") is True:
        return False
    body["stream_options"] = {**opts, "include_usage": True}
    return True


# --------------------------------------------------------------------- SSE


def _event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` payload of one raw SSE event."""
    if (
        event.startswith(b"data: ")
        and event.endswith(b"\n\n")
        and event.count(b"\n") == 2
        and b"\r" not in event
    ):
        return event[6:-2]  # the usual one-line event: what the loop below gives
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def _clean_end(data: bytes | bytearray) -> bool:
    """Whether ``data`` (starting at an event boundary) is whole events split by plain LFs.

    It ends in exactly one blank line (``x\\n\\n``) and has no CR, so nothing is left
    over after its last event and every blank line is a plain ``\\n\\n``.
    """
    return data.endswith(b"\n\n") and not data.endswith(b"\n\n\n") and b"\r" not in data


class SSEUsage:
    """Watches a server-sent event stream for usage, optionally stripping the usage chunk.

    :meth:`feed` takes raw upstream chunks and returns the bytes to relay now.
    Without stripping, every chunk is relayed unchanged and at once; events are
    only parsed on the side for usage. With ``strip_usage_chunk``, complete events
    are relayed as soon as their terminating blank line arrives, and an event
    whose JSON has ``"choices": []`` and a ``usage`` object (the chunk an injected
    ``include_usage`` adds) is dropped. :meth:`flush` returns what is left at the end.

    Only events that mention ``usage`` are parsed. Chunks of whole LF-separated
    events (what engines send) are searched for ``usage`` and passed on in slices;
    anything else (a partial event, CR line ends) goes event by event.
    """

    def __init__(self, *, strip_usage_chunk: bool = False, max_event_bytes: int = 1 << 20) -> None:
        self.strip = strip_usage_chunk
        self.tokens: int | None = None
        self.stripped = 0
        self._buf = bytearray()
        self._max = max_event_bytes
        self._overflow = False

    def feed(self, chunk: bytes) -> bytes:
        if (
            not self._buf
            and b"usage" not in chunk
            and chunk.endswith(b"\n\n")
            and not chunk.endswith(b"\n\n\n")
            and b"\r" not in chunk
        ):
            # Whole plain events without usage (nearly every chunk): relayed as they
            # are, nothing to inspect or keep (what _split_clean would find, cheaply).
            return chunk
        if not chunk:
            return b""
        if self._overflow:
            return chunk
        if self._buf:
            self._buf += chunk
            if _clean_end(self._buf):
                data = bytes(self._buf)
                self._buf.clear()
                out = self._split_clean(data)
            else:
                out = self._split_buffered()
        elif _clean_end(chunk):
            out = self._split_clean(chunk)
        else:
            self._buf += chunk
            out = self._split_buffered()
        return out if self.strip else chunk

    def flush(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        if rest and not self._overflow:
            self._inspect(rest)
        return rest if self.strip else b""

    def _split_clean(self, data: bytes) -> bytes:
        """Handle whole events (see :func:`_clean_end`); the bytes to relay when stripping.

        Each ``usage`` is located in its event: the event starts after the last
        ``\\n\\n`` before it (a boundary unless another newline precedes it) and
        ends at the first ``\\n\\n`` after it. Only that event is inspected.
        """
        pos = 0
        parts: list[bytes] = []
        while True:
            at = data.find(b"usage", pos)
            if at < 0:
                break
            pair = data.rfind(b"\n\n", pos, at)
            if pair > pos and data[pair - 1] == 0x0A:
                # A run of newlines: leave the exact splitting to the event-by-event path.
                self._buf += data[pos:]
                return b"".join(parts) + self._split_buffered()
            start = pos if pair < 0 else pair + 2
            end = data.index(b"\n\n", at) + 2
            if self._inspect(data[start:end]) and self.strip:
                self.stripped += 1
                parts.append(data[pos:start])
            elif self.strip:
                parts.append(data[pos:end])
            pos = end
        if not parts:
            return data
        parts.append(data[pos:])
        return b"".join(parts)

    def _split_buffered(self) -> bytes:
        """Take the buffer's complete events one by one; the bytes to relay when stripping."""
        out = bytearray()
        while True:
            end = self._event_end()
            if end is None:
                break
            event = bytes(self._buf[:end])
            del self._buf[:end]
            if self._inspect(event) and self.strip:
                self.stripped += 1
                continue
            if self.strip:
                out += event
        if len(self._buf) > self._max:
            # A pathological event: stop inspecting rather than buffer without bound.
            self._overflow = True
            if self.strip:
                out += self._buf
            self._buf.clear()
        return bytes(out)

    def _event_end(self) -> int | None:
        """Index just past the first complete event (its blank line) in the buffer."""
        buf = self._buf
        i = buf.find(b"\n\n")
        best = None if i < 0 else i + 2
        if b"\r" in buf:  # the CR separators cannot occur otherwise
            for sep in (b"\r\n\r\n", b"\r\r"):
                i = buf.find(sep)
                if i >= 0 and (best is None or i + len(sep) < best):
                    best = i + len(sep)
        return best

    def _inspect(self, event: bytes) -> bool:
        """Record usage in ``event``; True if it is a usage-only chunk."""
        if b"usage" not in event:
            return False
        data = _event_data(event)
        if data is None or data == b"[DONE]":
            return False
        try:
            obj = loads(data)
        except ValueError:
            return False
        if type(obj) is dict and type(usage := obj.get("usage")) is dict:
            # The engines' usage chunk, read without the general walk below.
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(prompt) is int and type(completion) is int:
                self.tokens = prompt + completion
                return obj.get("choices") == []
        tokens = usage_from_object(obj)
        if tokens is None:
            return False
        self.tokens = tokens
        return isinstance(obj, _MAPPINGS) and obj.get("choices") == []
