"""The OpenAI-compatible request and response shapes the simulated engine speaks.

Requests are read leniently, as vLLM reads them: unknown fields are ignored,
sampling parameters (``temperature``, ``stop``, ...) are accepted and have no
effect, and every request generates exactly its ``max_tokens`` (or
``max_completion_tokens``) tokens, finishing with ``finish_reason: "length"``.
Only what the engine cannot honour is refused, with a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from concur.sim.server.prompt import ROLE_IDS, Message

__all__ = [
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_chat",
    "parse_completion",
    "usage",
]


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, message."""

    def __init__(
        self, status: int, message: str, *, type_: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error response body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None
    messages: tuple[Message, ...]
    max_tokens: int
    stream: bool
    include_usage: bool
    priority: int = 0
    """vLLM's ``priority`` (lowest first), which only its priority scheduler reads."""


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str | None
    prompt: str | tuple[int, ...]
    max_tokens: int
    stream: bool
    include_usage: bool
    priority: int = 0
    """vLLM's ``priority`` (lowest first), which only its priority scheduler reads."""


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _common(
    body: Mapping[str, Any], names: Sequence[str], default_max_tokens: int
) -> tuple[str | None, int, bool, bool, int]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {model!r}", "model")
    field, max_tokens = names[-1], default_max_tokens
    for name in names:
        if body.get(name) is not None:
            field, max_tokens = name, body[name]
            break
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"'{field}' must be an integer >= 1, got {max_tokens!r}", field)
    n = body.get("n", 1)
    if n not in (1, None):
        raise _bad(f"'n' must be 1 on the simulated engine, got {n!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(stream) and bool(options.get("include_usage"))
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise _bad(f"'priority' must be an integer, got {priority!r}", "priority")
    return model, max_tokens, bool(stream), include_usage, priority


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or the text of its ``text`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where}.content must be a string, a list of parts or null", f"{where}.content")


def parse_chat(body: Any, default_max_tokens: int) -> ChatRequest:
    """Read a ``/v1/chat/completions`` body; raises :class:`ApiError`."""
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty list of messages", "messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLE_IDS:
            raise _bad(
                f"{where}.role must be one of {', '.join(sorted(ROLE_IDS))}, got {role!r}",
                f"{where}.role",
            )
        extra = ""
        calls = m.get("tool_calls")
        if calls:
            extra = json.dumps(calls, separators=(",", ":"), sort_keys=True)
        messages.append(Message(role, _content_text(m.get("content"), where), extra))
    model, max_tokens, stream, include_usage, priority = _common(
        body, ("max_completion_tokens", "max_tokens"), default_max_tokens
    )
    return ChatRequest(model, tuple(messages), max_tokens, stream, include_usage, priority)


def parse_completion(body: Any, default_max_tokens: int) -> CompletionRequest:
    """Read a ``/v1/completions`` body; raises :class:`ApiError`."""
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    parsed: str | tuple[int, ...]
    if isinstance(prompt, str):
        parsed = prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
        parsed = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _bad(
            "batched prompts are not supported by the simulated engine: send one prompt "
            "(a string or a list of token ids) per request",
            "prompt",
        )
    else:
        raise _bad(
            "'prompt' must be a string or a non-empty list of non-negative token ids", "prompt"
        )
    if not parsed:
        raise _bad("'prompt' must not be empty", "prompt")
    model, max_tokens, stream, include_usage, priority = _common(
        body, ("max_tokens",), default_max_tokens
    )
    return CompletionRequest(model, parsed, max_tokens, stream, include_usage, priority)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_response(
    rid: str, created: int, model: str, text: str, usage_: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": usage_,
    }


def completion_response(
    rid: str, created: int, model: str, text: str, usage_: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": usage_,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed ``text_completion``; ``text=None`` makes the usage-only chunk."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": []
        if text is None
        else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
