"""A fake vLLM OpenAI server for tests: a real aiohttp app on a loopback port.

It speaks enough of vLLM's API for the proxy tests:

* ``GET /metrics``: vLLM V1's Prometheus names and labels (``engine``, ``model_name``),
  ``_created`` series, ``cache_config_info``; KV usage set by the test
  (:attr:`FakeVLLM.kv_usage`);
* ``POST /v1/chat/completions`` and ``/v1/completions``: streaming (SSE, ending
  ``data: [DONE]``, a usage-only chunk only when ``stream_options.include_usage``)
  and non-streaming, with ``usage``;
* ``GET /v1/models``, ``GET /health``, ``POST /tokenize``;
* ``/echo/...`` (any method): answers with what it received, for fidelity checks;
  ``?status=N`` sets the status, ``?hop=1`` adds hop-by-hop response headers,
  ``?redirect=1`` answers 302.

Per-request knobs (headers, forwarded by the proxy untouched):
``X-Fake-Tokens`` (completion tokens, default 3), ``X-Fake-Delay`` (seconds between
stream chunks), ``X-Fake-Header-Delay`` (seconds before the response starts),
``X-Fake-Die-After`` (close the connection after that many chunks).
Each request is recorded; a request whose handler is cancelled (the client, i.e. the
proxy, went away) is recorded in :attr:`FakeVLLM.cancelled`.

Fault injection, for the reliability tests (``tests/reliability``):

* :attr:`FakeVLLM.metrics_fault` breaks ``GET /metrics``: ``"500"``, ``"garbage"``
  (200 with text that is not an exposition), ``"timeout"`` (never answers),
  ``"missing-kv"`` (a valid page without the KV usage gauge), ``"reset"`` (closes the
  connection); the counters (:attr:`preemptions`, :attr:`prefix_hits`, ...) can be set
  lower to play an engine restart. :meth:`stop` then :meth:`start` reopens on the
  same port, so "connection refused" can come and go;
* :attr:`FakeVLLM.strict_json`: generation endpoints answer 400 to a body that is not
  a JSON object, as vLLM does (default off: the fake is lenient);
* per-request headers on the generation endpoints: ``X-Fake-Status: N`` answers N with
  a vLLM-style error body (:meth:`FakeVLLM.error_body`; 503 adds ``Retry-After: 7``);
  ``X-Fake-Reset: headers`` closes the connection before any response;
  ``X-Fake-Truncate: 1`` sends a non-streaming response's headers and half its body,
  then closes; ``X-Fake-Bulk: N`` streams at least N bytes of SSE as fast as the connection
  takes them, counting in :attr:`FakeVLLM.bulk_written` (by ``X-Test-Id``) how many
  bytes each write handed to the socket.

:attr:`FakeVLLM.received` lists the raw target of every request that reached the fake
(except ``/metrics`` and ``/health``), routed or not: proof of where the proxy sent it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MODEL = "m"


@dataclass
class Seen:
    """One request as the fake saw it."""

    test_id: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    json: Any = None
    finished: bool = False
    cancelled: bool = False


@dataclass
class FakeVLLM:
    kv_usage: float = 0.1
    num_gpu_blocks: int = 100_000
    block_size: int = 16
    preemptions: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    _runner: web.AppRunner | None = None
    port: int = 0
    metrics_fault: str | None = None
    strict_json: bool = False
    received: list[str] = field(default_factory=list)
    bulk_written: dict[str, int] = field(default_factory=dict)
    metrics_scrapes: int = 0
    tls: ssl.SSLContext | None = None
    """Serve https with this server context (url then says https://)."""

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> FakeVLLM:
        app = web.Application(middlewares=[self._witness])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/responses", self._generate)
        app.router.add_route("*", "/echo/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        # port: 0 at first, then kept (a restarted fake comes back on the same port)
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeVLLM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- views

    @property
    def cancelled(self) -> list[str]:
        return [s.test_id for s in self.seen if s.cancelled]

    @property
    def finished(self) -> list[str]:
        return [s.test_id for s in self.seen if s.finished]

    def by_id(self, test_id: str) -> Seen:
        for s in self.seen:
            if s.test_id == test_id:
                return s
        raise KeyError(test_id)

    # -------------------------------------------------------------- handlers

    @web.middleware
    async def _witness(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in ("/metrics", "/health"):
            self.received.append(request.raw_path)
        return await handler(request)

    @staticmethod
    def error_body(status: int) -> bytes:
        """The exact body of an ``X-Fake-Status`` answer (vLLM's error shape)."""
        err = {
            "object": "error",
            "message": f"fake engine error {status}",
            "type": "BadRequestError" if status < 500 else "InternalServerError",
            "param": None,
            "code": status,
        }
        return json.dumps(err).encode()

    async def _record(self, request: web.Request) -> Seen:
        body = await request.read()
        seen = Seen(
            test_id=request.headers.get("X-Test-Id", uuid.uuid4().hex),
            method=request.method,
            path=request.path,
            query=request.rel_url.raw_query_string,
            headers=list(request.headers.items()),
            body=body,
        )
        if body and request.content_type == "application/json":
            try:
                seen.json = json.loads(body)
            except (ValueError, RecursionError):
                seen.json = None
        self.seen.append(seen)
        return seen

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        data = {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "vllm"}],
        }
        return web.json_response(data)

    async def _tokenize(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        text = (seen.json or {}).get("prompt", "")
        tokens = list(range(max(1, len(text) // 4)))
        return web.json_response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        if request.query.get("redirect"):
            raise web.HTTPFound("/elsewhere")
        status = int(request.query.get("status", "200"))
        headers = {"X-Echo": "yes"}
        if request.query.get("hop"):
            headers.update(
                {
                    "Connection": "X-Hop-Secret",
                    "X-Hop-Secret": "must-not-pass",
                    "Keep-Alive": "timeout=5",
                    "Proxy-Authenticate": "Basic",
                    "Proxy-Status": "fake",
                    "Upgrade": "h2c",
                }
            )
        if request.method == "HEAD":  # aiohttp sends the length, not the body
            return web.Response(body=b"x" * 42, status=status, headers=headers)
        if status in (204, 304):
            return web.Response(status=status, headers=headers)
        payload = {
            "method": seen.method,
            "path": seen.path,
            "raw_path": request.raw_path,
            "query": seen.query,
            "headers": seen.headers,
            "body": seen.body.decode("latin-1"),
        }
        resp = web.json_response(payload, status=status, headers=headers)
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        return resp

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.metrics_scrapes += 1
        fault = self.metrics_fault
        if fault == "500":
            return web.Response(status=500, text="Internal Server Error")
        if fault == "garbage":
            return web.Response(text="<html>\x00\x01 not { prometheus", content_type="text/html")
        if fault == "timeout":
            await asyncio.sleep(3600)
        if fault == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        lbl = f'engine="0",model_name="{MODEL}"'
        created = f"{time.time() - 100:.6e}"
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lbl}}} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lbl}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lbl}}} {self.kv_usage}",
            "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{{{lbl}}} {self.preemptions}",
            f"vllm:num_preemptions_created{{{lbl}}} {created}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{lbl}}} {self.prefix_queries}",
            f"vllm:prefix_cache_queries_created{{{lbl}}} {created}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{lbl}}} {self.prefix_hits}",
            f"vllm:prefix_cache_hits_created{{{lbl}}} {created}",
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            "# TYPE vllm:cache_config_info gauge",
            (
                f'vllm:cache_config_info{{block_size="{self.block_size}",cache_dtype="auto",'
                f'calculate_kv_scales="False",enable_prefix_caching="True",engine="0",'
                f'gpu_memory_utilization="0.9",is_attention_free="False",'
                f'num_cpu_blocks="None",num_gpu_blocks="{self.num_gpu_blocks}",'
                f'num_gpu_blocks_override="None",prefix_caching_hash_algo="builtin",'
                f'sliding_window="None",swap_space="4"}} 1.0'
            ),
        ]
        if fault == "missing-kv":
            lines = [ln for ln in lines if "kv_cache_usage_perc" not in ln]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8"
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        faulted = await self._generate_fault(request, seen)
        if faulted is not None:
            return faulted
        body = seen.json if isinstance(seen.json, dict) else {}
        n_tokens = int(request.headers.get("X-Fake-Tokens", "3"))
        delay = float(request.headers.get("X-Fake-Delay", "0"))
        header_delay = float(request.headers.get("X-Fake-Header-Delay", "0"))
        die_after = int(request.headers.get("X-Fake-Die-After", "-1"))
        chat = request.path.endswith("/chat/completions")
        prompt_chars = len(json.dumps(body.get("messages") or body.get("prompt") or ""))
        prompt_tokens = max(1, prompt_chars // 4)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_tokens,
            "total_tokens": prompt_tokens + n_tokens,
        }
        self.prefix_queries += prompt_tokens
        self.prefix_hits += prompt_tokens // 2
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.running += 1
        try:
            if header_delay:
                await asyncio.sleep(header_delay)
            if body.get("stream") is True:
                resp = await self._stream(
                    request, body, chat, rid, n_tokens, delay, die_after, usage
                )
            else:
                if delay:
                    await asyncio.sleep(delay * n_tokens)
                resp = web.json_response(self._complete(chat, rid, n_tokens, usage))
            seen.finished = True
            return resp
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            self.running -= 1

    async def _generate_fault(self, request: web.Request, seen: Seen) -> web.StreamResponse | None:
        """The response of a request that asked for a fault (or a strict-JSON 400); else None."""
        headers = request.headers
        if headers.get("X-Fake-Reset") == "headers":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if "X-Fake-Status" in headers:
            status = int(headers["X-Fake-Status"])
            extra = {"Retry-After": "7"} if status == 503 else {}
            return web.Response(
                status=status,
                body=self.error_body(status),
                content_type="application/json",
                headers=extra,
            )
        if self.strict_json and not isinstance(seen.json, dict):
            return web.Response(
                status=400, body=self.error_body(400), content_type="application/json"
            )
        if headers.get("X-Fake-Truncate"):
            full = json.dumps(self._complete(True, "chatcmpl-t", 50, {})).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(full)
            await resp.prepare(request)
            await resp.write(full[: len(full) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        if "X-Fake-Bulk" in headers:
            return await self._bulk(request, seen, int(headers["X-Fake-Bulk"]))
        return None

    async def _bulk(self, request: web.Request, seen: Seen, total: int) -> web.StreamResponse:
        """At least ``total`` bytes of SSE events, each write counted once the socket took it."""
        test_id = seen.test_id
        # A small send buffer: the bytes counted as written are (almost) all past the fake.
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        pad = "x" * 16_000
        event = b'data: {"choices":[{"index":0,"delta":{"content":"' + pad.encode() + b'"}}]}\n\n'
        self.bulk_written[test_id] = 0
        sent = 0
        try:
            while sent < total:  # whole events: at least ``total`` bytes
                await resp.write(event)
                sent += len(event)
                self.bulk_written[test_id] = sent
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            seen.cancelled = True  # concur dropped the connection mid-stream
            raise
        return resp

    @staticmethod
    def _complete(chat: bool, rid: str, n: int, usage: dict[str, int]) -> dict[str, Any]:
        text = "".join(f"tok{i} " for i in range(n))
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [choice],
            "usage": usage,
        }

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        rid: str,
        n: int,
        delay: float,
        die_after: int,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": MODEL,
                "choices": choices,
                **extra,
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                    delta["content"] = ""
                elif text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            await resp.write(chunk([choice(None, None, role=True)]))
        for i in range(n):
            if i == die_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(chunk([choice(f"tok{i} ", None)]))
        await resp.write(chunk([choice("" if not chat else None, "stop")]))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            await resp.write(chunk([], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
