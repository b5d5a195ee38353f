"""Inspect: the first layer of the request path (inspect, admit, forward, relay).

It reads the request body (up to ``server.max_body_bytes``), tells agent steps from
everything else, and for a step finds what the gate needs: the agent's identity
(:mod:`concur.identity`), whether this is its last step (the done header), a
prompt-size estimate; a streaming chat or completion request that did not ask for
usage gets ``stream_options.include_usage`` injected (:mod:`concur.usage`), so the
relay can read the usage and strip the chunk it adds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from concur import _priority, logs
from concur._errors import openai_error
from concur.identity import IdentityError, IdentityExtractor, IdentitySource
from concur.usage import (
    encode_with_include_usage,
    estimate_prompt_tokens,
    inject_include_usage,
    loads,
)

log = logging.getLogger("concur.proxy")

GATED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
"""POST paths that are agent steps and go through admission (a trailing slash ignored)."""

_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(slots=True)
class Step:
    """The gate-relevant facts of one request (all defaults: not an agent step)."""

    agent_id: str | None = None
    anonymous: bool = False
    done: bool = False
    context_tokens: int = 0
    strip_usage: bool = False
    """``include_usage`` was injected: the relay drops the usage-only chunk."""
    prioritize: bool = False
    """Stamp the engine-side priority once granted (:mod:`concur._priority`)."""


class BodyTooLarge(Exception):
    pass


def _is_json(content_type: str) -> bool:
    ct = content_type.lower()
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


class Inspector:
    """Reads and inspects requests; see the module docstring."""

    def __init__(
        self,
        *,
        identity: Sequence[str | IdentitySource],
        max_identity_bytes: int,
        anonymous: Literal["gate", "bypass"],
        done_header: str,
        gated_paths: frozenset[str],
        max_body_bytes: int,
        priority: bool = False,
    ) -> None:
        self.identity = IdentityExtractor(identity, max_identity_bytes)
        self.anonymous = anonymous
        self.done_header = done_header
        self.gated_paths = gated_paths
        self.max_body_bytes = max_body_bytes
        self.priority = priority
        """Stamp agent steps with the engine-side priority (:mod:`concur._priority`)."""

    # ------------------------------------------------------------------ body

    def read_body(self, request: web.Request) -> Awaitable[bytes]:
        """The body, read whole (``await`` it). Raises :class:`BodyTooLarge`, at once
        when the Content-Length says so, else when the chunks pass the limit."""
        length = request.content_length
        if length is None:
            return self._read_chunked(request)
        if length > self.max_body_bytes:
            raise BodyTooLarge
        # The parser feeds at most Content-Length bytes: read them in one call.
        return request.content.read()

    async def _read_chunked(self, request: web.Request) -> bytes:
        """A body without Content-Length, up to ``max_body_bytes``."""
        limit = self.max_body_bytes
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise BodyTooLarge
        return bytes(buf)

    def too_large(self, rid: str) -> web.Response:
        logs.event(log, "request_rejected", request_id=rid, status=413, reason="body_too_large")
        resp = openai_error(
            413,
            f"request body is larger than {self.max_body_bytes} bytes (server.max_body_bytes)",
            type_="invalid_request_error",
            code="request_too_large",
        )
        resp.force_close()
        return resp

    # ----------------------------------------------------------------- steps

    def step_path(self, request: web.Request) -> str | None:
        """The path of an agent step (trailing slash stripped); None for anything else."""
        if request.method != "POST":
            return None
        path = request.rel_url.path.rstrip("/")
        return path if path in self.gated_paths else None

    def inspect(self, request: web.Request, path: str, body: bytes, rid: str) -> tuple[Step, bytes]:
        """The step's agent, done flag and prompt estimate; the body to send upstream.

        The body is parsed only when it is JSON and an identity source reads it or the
        request may stream (stream_options injection); else the estimate comes from
        its size. Whether the step may carry an engine-side priority is decided here
        (:mod:`concur._priority`), its value once granted. Nothing of the parsed body
        outlives this call: a request held at the gate keeps only the bytes it will send.
        Raises :class:`IdentityError`.
        """
        headers = request.headers
        parsed: dict[str, Any] | None = None
        json_body = bool(body) and (
            headers.get("Content-Type") == "application/json" or _is_json(request.content_type)
        )
        unreadable = False  # parsed, and not a JSON object: it goes as it came
        if json_body and (self.identity.needs_body or b'"stream"' in body):
            try:
                obj = loads(body)
            except (ValueError, RecursionError):  # RecursionError: nested absurdly deep
                obj = None  # the engine will say what is wrong with it
            if isinstance(obj, dict):
                parsed = obj
            else:
                unreadable = True
        step = Step()
        found = self.identity.extract(headers, parsed)
        if found is not None:
            step.agent_id = found[0]
        elif self.anonymous == "gate":
            step.agent_id = f"anon-{rid}"
            step.anonymous = True
        if step.anonymous:
            step.done = True
        else:
            done = headers.get(self.done_header)
            step.done = done is not None and done.strip().lower() in _TRUE
        step.context_tokens = len(body) // 4
        step.prioritize = (
            self.priority
            and json_body
            and not unreadable
            and not step.anonymous
            and step.agent_id is not None
            and _priority.may_stamp(body, parsed)
        )
        if parsed is None:
            return step, body
        try:
            step.context_tokens = estimate_prompt_tokens(parsed)
            had_options = "stream_options" in parsed
            if step.agent_id is not None and inject_include_usage(path, parsed):
                body = encode_with_include_usage(body, parsed, had_options=had_options)
                step.strip_usage = True
        except RecursionError:  # too deep to walk or re-encode: forward it as it came
            step.prioritize = False
        return step, body

    def bad_identity(self, exc: IdentityError, rid: str) -> web.Response:
        logs.event(log, "request_rejected", request_id=rid, status=400, reason="identity")
        return openai_error(
            400, str(exc), type_="invalid_request_error", code="invalid_agent_identity"
        )
