"""The ``concur serve`` application: routes, handlers, the server, signals.

:func:`build_app` puts a :class:`~concur.runtime.Runtime` (the gate, controller,
poller, metrics and request path wired from :class:`~concur.config.Settings`) in an
aiohttp application; :class:`Server` runs that application on a socket with
graceful shutdown (used by the CLI and by the tests, on port 0); :func:`serve`
runs it until SIGTERM or SIGINT.

Own endpoints (answered here, never forwarded):

=========================  ==========================================================
``GET /concur/status``     window, agents, pressure, engine signal, policy (JSON)
``GET /concur/agents``     every admitted and queued agent (JSON)
``DELETE /concur/agents/{id}``  end an agent now (admin token, or the agent itself)
``GET/PUT /concur/policy``  read / swap the policy live (PUT needs the admin token)
``GET /metrics``           concur's own Prometheus metrics
``GET /healthz``           the process is alive
``GET /readyz``            the upstream answers and the engine signal is fresh
=========================  ==========================================================

Every other path (and method) goes to :class:`~concur.proxy.Proxy`. Paths under
``/concur/`` are reserved: unknown ones get 404 here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from concur import _views, logs
from concur._errors import openai_error
from concur._listen import BoundSite, ListenError, bind
from concur.config import Settings
from concur.poller import Poller
from concur.runtime import Clock, Runtime

log = logging.getLogger("concur.app")


RUNTIME = web.AppKey("concur_runtime", Runtime)
ADMIN_MAX_BODY = 1 << 20
"""Largest body of an admin request (``PUT /concur/policy``), in bytes."""


# ----------------------------------------------------------------- handlers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


async def _status(request: web.Request) -> web.Response:
    return _json(_views.status(request.app[RUNTIME]).to_json())


async def _agents(request: web.Request) -> web.Response:
    return _json({"agents": [a.to_json() for a in _views.agents(request.app[RUNTIME])]})


def _from_agent(rt: Runtime, request: web.Request, agent_id: str) -> bool:
    """Whether ``request`` comes from agent ``agent_id`` itself: its id in an identity
    header (as its own done step could end it, so can this)."""
    try:
        found = rt.proxy.inspector.identity.extract(request.headers, None)
    except ValueError:
        return False
    return found is not None and found[0] == agent_id


async def _delete_agent(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    agent_id = request.match_info["agent_id"]
    refused = None if _from_agent(rt, request, agent_id) else rt.admin.authorize(request)
    if refused is not None:
        return refused
    if not rt.gate.end(agent_id, "deleted"):
        return openai_error(
            404, f"no agent {agent_id!r} is admitted or queued", type_="not_found", code="no_agent"
        )
    return _json({"ended": agent_id})


async def _get_policy(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return _json({"policy": rt.controller.policy.describe(), "window": rt.gate.window})


async def _put_policy(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    refused = rt.admin.authorize(request)
    if refused is not None:
        return refused
    try:
        payload = await request.json()
    except web.HTTPRequestEntityTooLarge:
        return openai_error(
            413,
            f"the policy body is larger than {ADMIN_MAX_BODY} bytes",
            type_="invalid_request_error",
            code="request_too_large",
        )
    except ValueError:
        return openai_error(
            400, "the body must be a JSON object", type_="invalid_request_error", code="bad_json"
        )
    try:
        described = rt.admin.set_policy(payload)
    except ValueError as exc:
        return openai_error(
            400, f"policy not changed: {exc}", type_="invalid_request_error", code="bad_policy"
        )
    return _json({"policy": described, "window": rt.gate.window})


async def _metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.metrics.update(_views.gauges(rt))
    body, content_type = rt.metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    reasons = await _views.unready(request.app[RUNTIME])
    if reasons:
        return _json({"ready": False, "reasons": reasons}, status=503)
    return _json({"ready": True})


async def _reserved(request: web.Request) -> web.Response:
    return openai_error(
        404,
        f"no concur endpoint {request.method} {request.path} (paths under /concur/ are not "
        "forwarded upstream)",
        type_="not_found",
        code="unknown_endpoint",
    )


def build_app(
    settings: Settings, *, clock: Clock = time.monotonic, poller: Poller | None = None
) -> web.Application:
    """The aiohttp application for ``concur serve``.

    The runtime starts with the application (upstream client, poller, control
    loop); ``on_shutdown`` closes the gate (queued agents get 503) while the
    server lets in-flight requests finish; cleanup stops the loops.
    """
    # client_max_size only bounds request.read()/json() (admin endpoints); the proxy
    # streams bodies itself and enforces server.max_body_bytes.
    app = web.Application(client_max_size=ADMIN_MAX_BODY)
    runtime = Runtime(settings, clock=clock, poller=poller)
    app[RUNTIME] = runtime

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    async def on_shutdown(app: web.Application) -> None:
        runtime.begin_shutdown()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    r.add_get("/concur/status", _status)
    r.add_get("/concur/agents", _agents)
    r.add_delete("/concur/agents/{agent_id:.+}", _delete_agent)
    r.add_get("/concur/policy", _get_policy)
    r.add_put("/concur/policy", _put_policy)
    r.add_route("*", "/concur/{tail:.*}", _reserved)
    r.add_get("/metrics", _metrics)
    r.add_get("/healthz", _healthz)
    r.add_get("/readyz", _readyz)
    r.add_route("*", "/{tail:.*}", runtime.proxy.handle)
    return app


LISTEN_BACKLOG = 4096
"""Connections the kernel completes before concur accepts them (capped by the kernel's
``net.core.somaxconn``). aiohttp's default, 128, drops the SYNs of a burst of agents
arriving together while the event loop is busy, and each dropped client waits for a
TCP retransmit (1 s, then 3 s, ...) before it is even seen."""


class Server:
    """Runs an application on host:port with handler cancellation and a bounded drain."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        drain_timeout: float = 30.0,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.backlog = backlog
        self.runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that disconnects cancels its request
            shutdown_timeout=drain_timeout,
            access_log=None,
        )
        self._set_up = False

    async def start(self) -> None:
        """Bind the address first (an OSError then, and nothing has started), then start
        the application (its runtime logs ``started``), then serve."""
        bound = await bind(self.host, self.port, self.backlog, self.runner)
        try:
            self._set_up = True
            await self.runner.setup()
            await BoundSite(self.runner, bound).start()
        except BaseException:
            bound.close()
            raise
        self.port = int(bound.sockets[0].getsockname()[1])
        logs.event(log, "listening", host=self.host, port=self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, close the gate, drain in-flight requests, stop the loops."""
        if self._set_up:
            await self.runner.cleanup()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts local connections."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or a wildcard: assume reachable


def warn_if_exposed(settings: Settings) -> bool:
    """Log a warning when concur listens beyond loopback with no admin token; True if it did."""
    srv = settings.server
    if is_loopback(srv.host) or srv.admin_token is not None:
        return False
    logs.event(
        log,
        "exposed_without_admin_token",
        logging.WARNING,
        host=srv.host,
        port=srv.port,
        hint=(
            "anyone who can reach this address can send requests to the engine and read "
            "/concur/status and /concur/agents, and the admin endpoints stay disabled: set "
            "server.admin_token (CONCUR_SERVER__ADMIN_TOKEN) and restrict the port with a "
            "firewall or network policy, or listen on 127.0.0.1"
        ),
    )
    return True


def freeze_startup_objects() -> None:
    """Leave everything start-up built (modules, settings, metrics, ...) out of future GCs.

    The collector's full passes otherwise walk these tens of thousands of long-lived
    objects again and again under load; measured with 256 streaming clients, about a
    third of the process's GC time went away. Start-up garbage is collected first.
    """
    gc.collect()
    gc.freeze()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; the exit code."""
    warn_if_exposed(settings)
    app = build_app(settings)
    server = Server(
        app, settings.server.host, settings.server.port, drain_timeout=settings.server.drain_timeout
    )
    try:
        await server.start()
    except ListenError as exc:
        srv = settings.server
        logs.event(
            log,
            "listen_failed",
            logging.ERROR,
            host=srv.host,
            port=srv.port,
            error=f"cannot listen on {srv.host}:{srv.port}: {exc.strerror or exc}",
            hint="another process may hold the port: stop it, or choose another address "
            "with --listen HOST:PORT or server.port",
        )
        await server.stop()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    freeze_startup_objects()
    try:
        await stop.wait()
        logs.event(log, "signal_received")
    finally:
        await server.stop()
    return 0
