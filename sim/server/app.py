"""``concur engine``: an HTTP server that behaves like vLLM, driven by the engine model.

Endpoints:

- ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI-compatible,
  streaming (SSE, ``data: [DONE]``, the usage-only chunk when
  ``stream_options.include_usage``) or not; ``usage`` with
  ``prompt_tokens_details.cached_tokens``. Every request generates exactly its
  ``max_tokens`` tokens of filler text at the engine model's pace (see
  :mod:`concur.sim.server.protocol`, :mod:`concur.sim.server.prompt`);
- ``GET /v1/models``, ``GET /health`` (503 if the engine loop died);
- ``GET /metrics``: vLLM V1's metrics (:mod:`concur.sim.server.metrics`);
- ``GET /sim/stats``: the engine model's counters (recomputed tokens, evictions,
  ...) and the loop's lag, as JSON;
- ``GET|POST /sim/faults``: fault injection (:mod:`concur.sim.server.faults`).

A client that disconnects aborts its request in the engine (the runner cancels
the handler, and the handler's ``finally`` aborts), freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from concur import logs
from concur.sim.engine import EngineModel
from concur.sim.engine_config import EngineSpec
from concur.sim.server.clock import ScaledClock, WallClock
from concur.sim.server.driver import EngineDriver, EngineStopped, RequestStream
from concur.sim.server.faults import Faults
from concur.sim.server.metrics import KV_USAGE, EngineCounters, VllmMetrics
from concur.sim.server.prompt import BuiltPrompt, OutputRegistry, PromptBuilder, RecordedOutput
from concur.sim.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    parse_chat,
    parse_completion,
    usage,
)
from concur.sim.server.tokenizer import output_text

__all__ = [
    "ENGINE",
    "EngineServer",
    "EngineServerConfig",
    "EngineState",
    "build_engine_app",
    "serve_engine",
]

log = logging.getLogger("concur.sim.server")


@dataclass(frozen=True, slots=True)
class EngineServerConfig:
    """Everything ``concur engine`` is started with, except where it listens."""

    spec: EngineSpec = field(default_factory=EngineSpec)
    speed: float = 1.0
    """Simulated seconds per wall second."""
    model_name: str | None = None
    """The served model id; default ``concur-sim/<spec.model>``."""
    max_model_len: int | None = None
    """Longest prompt + output accepted; default: what the KV cache can hold."""
    default_max_tokens: int = 256
    """Output tokens of a request that sets no ``max_tokens``."""
    output_registry_size: int = 65_536
    """Chat outputs remembered so that re-sent assistant messages hit the cache."""
    faults: Faults = field(default_factory=Faults)
    drain_timeout: float = 5.0
    """Seconds in-flight requests get to finish at shutdown."""
    chunk_interval: float = 0.01
    """Least wall seconds between two SSE chunks of one stream (tokens produced
    meanwhile go out together; the last chunk is never held back). 0: a chunk per
    engine step."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"speed must be a positive number, got {self.speed}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not (math.isfinite(self.chunk_interval) and self.chunk_interval >= 0):
            raise ValueError(f"chunk_interval must be >= 0 seconds, got {self.chunk_interval}")
        if self.output_registry_size < 0:
            raise ValueError(f"output_registry_size must be >= 0, got {self.output_registry_size}")

    @property
    def served_model_name(self) -> str:
        return self.model_name or f"concur-sim/{self.spec.model}"


class EngineState:
    """The simulated engine behind one app: model, loop, prompts, metrics, faults."""

    def __init__(self, config: EngineServerConfig, wall: WallClock = time.monotonic) -> None:
        self.config = config
        self.engine_config = config.spec.build()
        cfg = self.engine_config
        self.engine = EngineModel(cfg)
        self.model_name = config.served_model_name
        usable = (cfg.num_blocks - 1) * cfg.block_size
        self.max_model_len = min(config.max_model_len or usable, usable)
        self.faults = config.faults
        self.prompts = PromptBuilder(cfg.block_size, OutputRegistry(config.output_registry_size))
        self.metrics = VllmMetrics(
            self.counters,
            model_name=self.model_name,
            config=cfg,
            max_model_len=self.max_model_len,
            omit=self._omitted_metrics,
        )
        # ``wall`` is the event loop's clock: loop.time() is time.monotonic() by default.
        self.driver = EngineDriver(
            self.engine,
            ScaledClock(config.speed, wall),
            on_finish=self.metrics.observe_finish,
        )
        self.created = int(time.time())
        self._ids = itertools.count(1)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):08d}"

    def counters(self) -> EngineCounters:
        engine = self.engine
        stats = engine.stats
        driver = self.driver
        return EngineCounters(
            kv_usage=engine.kv_usage,
            running=engine.num_running,
            waiting=engine.num_waiting,
            preemptions=stats.preemptions,
            prefix_queries=stats.prefix_queries,
            prefix_hits=stats.prefix_hits,
            prompt_tokens=driver.prompt_tokens_total,
            generation_tokens=stats.output_tokens,
            finished=driver.finished_total,
            aborted=driver.aborted_total,
        )

    def _omitted_metrics(self) -> frozenset[str]:
        return frozenset({KV_USAGE}) if self.faults.metrics == "missing-kv" else frozenset()

    def stats(self) -> dict[str, Any]:
        """``GET /sim/stats``."""
        engine = self.engine
        stats = engine.stats
        driver = self.driver
        return {
            "model": self.model_name,
            "engine": self.config.spec.describe(),
            "speed": self.config.speed,
            "sim_time": driver.now(),
            "lag_s": driver.lag,
            "max_lag_s": driver.max_lag,
            "in_flight": driver.in_flight,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "kv_usage": engine.kv_usage,
            "kv_capacity_tokens": self.engine_config.kv_capacity_tokens,
            "hit_rate": stats.hit_rate,
            "outputs_remembered": len(self.prompts.registry),
            "stats": dataclasses.asdict(stats),
        }

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                type_="NotFoundError",
                param="model",
            )

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        total = prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({prompt_tokens} in the messages, {max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )


ENGINE = web.AppKey("concur_engine", EngineState)


# ---------------------------------------------------------------- handlers


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        body = error_body(exc.status, exc.message, exc.type, exc.param)
        return web.json_response(body, status=exc.status)
    except EngineStopped as exc:
        body = error_body(503, str(exc), "ServiceUnavailableError")
        return web.json_response(body, status=503)


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


async def _hang() -> None:
    """Wait until cancelled (the client went away, or the server shuts down)."""
    await asyncio.Event().wait()


async def _completion_fault(request: web.Request, state: EngineState, stream: bool) -> None:
    fault = state.faults.completions
    if fault is None:
        return
    if fault == "500":
        raise ApiError(
            500, "simulated engine failure (fault injection)", type_="InternalServerError"
        )
    if fault == "reset":
        if request.transport is not None:
            request.transport.close()
        await _hang()
    if fault == "stall":
        if stream:
            resp = _sse_response()
            await resp.prepare(request)
        await _hang()


def _sse_response() -> web.StreamResponse:
    return web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[ENGINE]
    body = await _json_body(request)
    req = parse_chat(body, state.config.default_max_tokens)
    await _completion_fault(request, state, req.stream)
    state.check_model(req.model)
    return await _generate(request, state, state.prompts.chat(req.messages), req)


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[ENGINE]
    body = await _json_body(request)
    req = parse_completion(body, state.config.default_max_tokens)
    await _completion_fault(request, state, req.stream)
    state.check_model(req.model)
    prompts = state.prompts
    prompt = prompts.text(req.prompt) if isinstance(req.prompt, str) else prompts.ids(req.prompt)
    return await _generate(request, state, prompt, req)


async def _generate(
    request: web.Request,
    state: EngineState,
    prompt: BuiltPrompt,
    req: ChatRequest | CompletionRequest,
) -> web.StreamResponse:
    chat = isinstance(req, ChatRequest)
    state.check_length(prompt.num_tokens, req.max_tokens)
    rid = state.new_request_id("chatcmpl" if chat else "cmpl")
    try:
        stream = state.driver.submit(
            rid, prompt.tokens, req.max_tokens, prompt.known_prefix_tokens, req.priority
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), param="max_tokens") from None
    try:
        if req.stream:
            return await _stream(request, state, stream, chat, req.include_usage)
        fin = await stream.result()
        text = output_text(rid, 0, fin.output_tokens, fin.output_tokens)
        if chat:
            state.prompts.registry.record(
                text, RecordedOutput(rid, fin.output_tokens, fin.prompt_tokens)
            )
        u = usage(fin.prompt_tokens, fin.output_tokens, fin.cached_tokens)
        make = chat_response if chat else completion_response
        return web.json_response(make(rid, int(time.time()), state.model_name, text, u))
    finally:
        if not stream.done:
            state.driver.abort(rid)
            logs.event(log, "request_aborted", logging.DEBUG, id=rid)


async def _stream(
    request: web.Request, state: EngineState, stream: RequestStream, chat: bool, include_usage: bool
) -> web.StreamResponse:
    rid = stream.request_id
    model = state.model_name
    created = int(time.time())
    total = stream.max_tokens
    interval = state.config.chunk_interval
    resp = _sse_response()
    await resp.prepare(request)
    try:
        if chat:
            await resp.write(
                _sse(chat_chunk(rid, created, model, {"role": "assistant", "content": ""}))
            )
        pos = 0
        while n := await stream.next_tokens():
            text = output_text(rid, pos, pos + n, total)
            pos += n
            chunk = (
                chat_chunk(rid, created, model, {"content": text})
                if chat
                else completion_chunk(rid, created, model, text)
            )
            await resp.write(_sse(chunk))
            # At most one chunk per chunk_interval: a chunk per step per stream costs
            # more than a fast engine step at high speed, and the loop would fall behind.
            await stream.settle(interval)
        fin = stream.finished
        assert fin is not None
        if chat:
            full = output_text(rid, 0, fin.output_tokens, fin.output_tokens)
            state.prompts.registry.record(
                full, RecordedOutput(rid, fin.output_tokens, fin.prompt_tokens)
            )
            last = chat_chunk(rid, created, model, {}, "length")
        else:
            last = completion_chunk(rid, created, model, "", "length")
        await resp.write(_sse(last))
        if include_usage:
            u = usage(fin.prompt_tokens, fin.output_tokens, fin.cached_tokens)
            only = (
                chat_chunk(rid, created, model, None, usage_=u)
                if chat
                else completion_chunk(rid, created, model, None, usage_=u)
            )
            await resp.write(_sse(only))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except EngineStopped as exc:
        with contextlib.suppress(ConnectionResetError):
            await resp.write(_sse(error_body(503, str(exc), "ServiceUnavailableError")))
    except ConnectionResetError:
        pass  # the client went away; _generate aborts the request
    return resp


async def _models(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "concur-sim",
        "root": state.model_name,
        "parent": None,
        "max_model_len": state.max_model_len,
        "permission": [],
    }
    return web.json_response({"object": "list", "data": [card]})


async def _health(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    return web.Response(status=200 if state.driver.healthy else 503)


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    fault = state.faults.metrics
    if fault == "500":
        return web.Response(status=500, text="simulated metrics failure (fault injection)\n")
    if fault == "garbage":
        return web.Response(text="<html><body>this is not a metrics page {{{</body></html>\n")
    if fault == "timeout":
        await _hang()
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].stats())


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].faults.to_json())


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    try:
        state.faults = Faults.from_json(await _json_body(request))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    faults = state.faults
    logs.event(log, "faults_set", metrics=faults.metrics, completions=faults.completions)
    return web.json_response(state.faults.to_json())


# ------------------------------------------------------------------ the app


def build_engine_app(
    config: EngineServerConfig, *, wall: WallClock = time.monotonic
) -> web.Application:
    """The aiohttp application of one simulated engine (the loop starts with the app)."""
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024**2)
    state = EngineState(config, wall)
    app[ENGINE] = state

    async def start(_app: web.Application) -> None:
        state.driver.start()

    async def stop(_app: web.Application) -> None:
        await state.driver.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_get("/sim/faults", _get_faults)
    app.router.add_post("/sim/faults", _set_faults)
    return app


class EngineServer:
    """A simulated engine listening on ``host:port`` (port 0: any free port)."""

    def __init__(
        self, config: EngineServerConfig, host: str = "127.0.0.1", port: int = 8000
    ) -> None:
        self.config = config
        self.app = build_engine_app(config)
        self.host = host
        self.port = port
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that disconnects cancels (aborts) its request
            shutdown_timeout=config.drain_timeout,
            access_log=None,
        )

    @property
    def state(self) -> EngineState:
        return self.app[ENGINE]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> EngineServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        if self.runner.addresses:
            self.port = int(self.runner.addresses[0][1])
        logs.event(
            log,
            "listening",
            url=self.url,
            model=self.state.model_name,
            engine=self.config.spec.describe(),
            speed=self.config.speed,
        )
        return self

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (``drain_timeout``), stop the loop."""
        await self.runner.cleanup()

    async def __aenter__(self) -> EngineServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_engine(
    config: EngineServerConfig,
    host: str,
    port: int,
    *,
    ready: Callable[[EngineServer], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; the exit code. ``ready`` is called once listening."""
    server = EngineServer(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as exc:
        logs.event(log, "listen_failed", logging.ERROR, host=host, port=port, error=str(exc))
        await server.stop()
        return 1
    try:
        if ready is not None:
            ready(server)
        await stop.wait()
        logs.event(log, "signal_received")
    finally:
        await server.stop()
    return 0
