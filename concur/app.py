"""The ``concur serve`` application: proxy routes, own endpoints, background loops, shutdown.

:class:`Runtime` wires one gate, controller, poller, metrics registry and proxy
together from :class:`~concur.config.Settings`; :func:`build_app` puts it in an
aiohttp application; :class:`Server` runs that application on a socket with
graceful shutdown (used by the CLI and by the tests, on port 0).

Own endpoints (answered here, never forwarded):

=========================  ==========================================================
``GET /concur/status``     window, agents, pressure, engine signal, policy (JSON)
``GET /concur/agents``     every admitted and queued agent (JSON)
``DELETE /concur/agents/{id}``  end an agent now (admin token)
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
import hmac
import ipaddress
import json
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from concur import logs
from concur._errors import openai_error
from concur._forward import make_upstream
from concur.adapters.registry import get_adapter
from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate, GateEvent
from concur.config import Settings, tls_context
from concur.control import Controller, TickRecord
from concur.metrics import ConcurMetrics, GaugeValues
from concur.policies import PolicyError, PolicySettings, build_policy
from concur.poller import Poller
from concur.proxy import Proxy, ProxyOptions
from concur.upstream import Upstream, UpstreamError

log = logging.getLogger("concur.app")

Clock = Callable[[], float]


def _redact(url: str) -> str:
    """A URL without its user:password part, for status pages and logs."""
    u = URL(url)
    return str(u.with_user(None)) if u.user or u.password else url


def proxy_options(settings: Settings) -> ProxyOptions:
    up, adm = settings.upstream, settings.admission
    return ProxyOptions(
        upstream=up.url,
        connect_timeout=up.connect_timeout,
        first_byte_timeout=up.first_byte_timeout,
        read_timeout=up.read_timeout,
        send_timeout=settings.server.send_timeout,
        max_body_bytes=settings.server.max_body_bytes,
        identity=tuple(adm.identity),
        max_identity_bytes=adm.max_identity_bytes,
        anonymous=adm.anonymous,
        done_header=adm.done_header,
        ssl_context=tls_context(up.ca_file),
    )


def make_poller(
    settings: Settings, clock: Clock, ssl_context: ssl.SSLContext | None = None
) -> Poller:
    """The engine poller, from ``engine.*`` (the metrics URL defaults to the upstream's);
    ``ssl_context`` is the upstream client's, so ``upstream.ca_file`` is read once."""
    adapter = get_adapter(settings.engine.kind)
    url = settings.metrics_url()
    base = url[: -len(adapter.metrics_path)] if url.endswith(adapter.metrics_path) else url
    eng = settings.engine
    return Poller(
        base,
        adapter,
        poll_interval=eng.poll_interval,
        timeout=eng.poll_timeout,
        stale_after=eng.stale_after,
        max_backoff=max(5.0, eng.poll_interval),
        clock=clock,
        ssl_context=ssl_context,
    )


def _signal_dict(sig: EngineSignal | None) -> dict[str, Any] | None:
    if sig is None:
        return None
    out = asdict(sig)
    out.pop("timestamp", None)
    return out


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Runtime:
    """Everything one running proxy owns. Build it inside a running event loop's app."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.monotonic,
        poller: Poller | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = ConcurMetrics()
        adm = settings.admission
        self.gate = AdmissionGate(
            clock=clock,
            max_queue_len=adm.max_queue_len,
            max_queue_wait=adm.max_queue_wait,
            idle_timeout=adm.idle_timeout,
            on_event=self._on_gate_event,
        )
        self.policy_settings: PolicySettings = settings.policy
        self.controller = Controller(
            build_policy(None, settings.policy),
            self.gate,
            failure_mode=settings.control.failure_mode,
            on_tick=self._on_tick,
        )
        self.options = proxy_options(settings)
        self.poller = (
            poller if poller is not None else make_poller(settings, clock, self.options.ssl_context)
        )
        self.upstream: Upstream | None = None
        # Built now so the application can route to its handler directly; it gets its
        # upstream client (whose connections need the running loop) in start().
        self.proxy = Proxy(self.options, self.gate, self.metrics)
        self.started_at = clock()
        self._control_task: asyncio.Task[None] | None = None
        self.shutting_down = False

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        opts = self.options
        self.upstream = self.proxy.upstream = make_upstream(
            opts.upstream, opts.connect_timeout, opts.ssl_context
        )
        self.poller.start()
        self._control_task = asyncio.create_task(self._control_loop(), name="concur-control")
        logs.event(
            log,
            "started",
            upstream=_redact(self.options.upstream),
            metrics_url=_redact(self.poller.url),
            policy=self.controller.policy.describe(),
            window=self.gate.window,
        )

    def begin_shutdown(self) -> None:
        """Stop admitting: queued agents get 503 now; in-flight requests may finish."""
        if self.shutting_down:
            return
        self.shutting_down = True
        logs.event(
            log,
            "draining",
            in_flight=self.proxy.in_flight,
            queued=self.gate.queued,
            drain_timeout=self.settings.server.drain_timeout,
        )
        self.gate.close()

    async def stop(self) -> None:
        task, self._control_task = self._control_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.poller.stop()
        if self.upstream is not None:
            await self.upstream.close()
        logs.event(log, "stopped", active=self.gate.active, queued=self.gate.queued)

    async def _control_loop(self) -> None:
        interval = self.settings.control.interval
        while True:
            now = self.clock()
            try:
                self.controller.tick(now, self.poller.signal, stale=self.poller.is_stale(now))
            except Exception:  # a bug in a policy must not stop admission control
                log.exception("control tick failed")
            await asyncio.sleep(interval)

    # --------------------------------------------------------- callbacks

    def _on_gate_event(self, event: GateEvent) -> None:
        self.metrics.on_gate_event(event)
        level = logging.DEBUG if event.kind in ("held", "released") else logging.INFO
        logs.event(
            log,
            "admission",
            level,
            outcome=event.kind,
            agent=event.agent_id,
            waited=None if event.waited is None else round(event.waited, 4),
            detail=event.detail or None,
            window=self.gate.window,
            live=self.gate.live,
            queued=self.gate.queued,
        )

    def _on_tick(self, record: TickRecord) -> None:
        self.metrics.on_tick(record)
        if record.window_before == record.decision.window:
            return
        obs, dec = record.observation, record.decision
        logs.event(
            log,
            "window",
            before=record.window_before,
            after=dec.window,
            reason=dec.reason,
            pressure=dec.pressure,
            parts=dict(dec.parts),
            kv_usage=obs.kv_usage,
            hit_rate=obs.hit_rate,
            live=obs.live,
            paused=obs.paused,
            queued=obs.queued,
            stale=record.stale,
        )

    # ------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        now = self.clock()
        view = self.gate.view()
        last = self.controller.last
        sig = self.poller.signal
        age = self.poller.age(now)
        return {
            "window": view.window,
            "active": view.active,
            "live": view.live,
            "paused": view.paused,
            "queued": view.queued,
            "held": view.held,
            "in_flight": self.proxy.in_flight,
            "live_tokens": view.live_tokens,
            "pressure": last.decision.pressure if last else None,
            "pressure_parts": dict(last.decision.parts) if last else {},
            "decision": last.decision.reason if last else None,
            "last_tick_age_seconds": None if last is None else now - last.now,
            "hit_rate": last.observation.hit_rate if last else None,
            "capacity_tokens": last.observation.capacity_tokens if last else None,
            "signal": _signal_dict(sig),
            "signal_age_seconds": age,
            "stale": self.poller.is_stale(now),
            "poll_error": self.poller.last_error,
            "policy": self.controller.policy.describe(),
            "failure_mode": self.controller.failure_mode,
            "upstream": _redact(self.options.upstream),
            "shutting_down": self.shutting_down,
            "uptime_seconds": now - self.started_at,
        }

    def agents(self) -> list[dict[str, Any]]:
        now = self.clock()
        wall = time.time()

        def iso(t: float) -> str:
            return datetime.fromtimestamp(wall - (now - t), tz=UTC).isoformat(timespec="seconds")

        return [
            {
                "id": a.agent_id,
                "state": str(a.state),
                "since": iso(a.since),
                "in_state_seconds": round(now - a.since, 3),
                "idle_seconds": round(now - a.last_seen, 3),
                "requests": a.requests,
                "in_flight": a.in_flight,
                "pending": len(a.pending),
                "context_tokens": a.context_tokens,
                "ending": a.ending,
            }
            for a in self.gate.agents()
        ]

    def gauge_values(self) -> GaugeValues:
        status = self.status()
        sig = self.poller.signal
        return GaugeValues(
            window=status["window"],
            active=status["active"],
            live=status["live"],
            paused=status["paused"],
            queued=status["queued"],
            pressure=status["pressure"],
            kv_usage=None if sig is None else sig.kv_usage,
            hit_rate=status["hit_rate"],
            signal_age=status["signal_age_seconds"],
            parts=status["pressure_parts"],
        )

    # ------------------------------------------------------------- admin

    def authorize(self, request: web.Request) -> web.Response | None:
        """None when the request carries the admin token; else the 403/401 to send."""
        token = self.settings.server.admin_token
        if token is None:
            return openai_error(
                403,
                "admin endpoints are disabled: set server.admin_token "
                "(CONCUR_SERVER__ADMIN_TOKEN) to enable them",
                type_="permission_error",
                code="admin_disabled",
            )
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.get_secret_value().encode()
        )
        if ok:
            return None
        return openai_error(
            401,
            "missing or wrong admin token: send 'Authorization: Bearer <server.admin_token>'",
            type_="authentication_error",
            code="invalid_admin_token",
            headers={"WWW-Authenticate": 'Bearer realm="concur"'},
        )

    def set_policy(self, payload: Any) -> dict[str, object]:
        """Merge ``payload`` into the current policy settings and swap the policy.

        Raises ValueError (with a message for the client) and keeps the old policy.
        """
        if not isinstance(payload, dict):
            raise ValueError(
                'expected a JSON object such as {"name": "aimd", "aimd": {"high": 0.9}}'
            )
        merged = _deep_merge(self.policy_settings.model_dump(exclude_unset=True), payload)
        try:
            new_settings = PolicySettings.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(_validation_message(exc)) from None
        try:
            policy = build_policy(None, new_settings)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        old = self.controller.policy.describe()
        self.controller.set_policy(policy)
        self.policy_settings = new_settings
        described = policy.describe()
        logs.event(log, "policy_changed", old=old, new=described, window=self.gate.window)
        return described


RUNTIME = web.AppKey("concur_runtime", Runtime)


# ----------------------------------------------------------------- handlers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[RUNTIME].status())


async def _agents(request: web.Request) -> web.Response:
    return _json({"agents": request.app[RUNTIME].agents()})


async def _delete_agent(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    refused = rt.authorize(request)
    if refused is not None:
        return refused
    agent_id = request.match_info["agent_id"]
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
    refused = rt.authorize(request)
    if refused is not None:
        return refused
    try:
        payload = await request.json()
    except ValueError:
        return openai_error(
            400, "the body must be a JSON object", type_="invalid_request_error", code="bad_json"
        )
    try:
        described = rt.set_policy(payload)
    except ValueError as exc:
        return openai_error(
            400, f"policy not changed: {exc}", type_="invalid_request_error", code="bad_policy"
        )
    return _json({"policy": described, "window": rt.gate.window})


async def _metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.metrics.update(rt.gauge_values())
    body, content_type = rt.metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    reasons: list[str] = []
    if rt.shutting_down:
        reasons.append("shutting down")
    now = rt.clock()
    if rt.poller.signal is None:
        reasons.append(f"no engine signal yet from {_redact(rt.poller.url)}")
    elif rt.poller.is_stale(now):
        age = rt.poller.age(now) or 0.0
        reasons.append(
            f"engine signal is stale ({age:.1f}s old > engine.stale_after "
            f"{rt.poller.stale_after:g}s); last error: {rt.poller.last_error}"
        )
    problem = await _probe_upstream(rt)
    if problem is not None:
        reasons.append(problem)
    if reasons:
        return _json({"ready": False, "reasons": reasons}, status=503)
    return _json({"ready": True})


async def _probe_upstream(rt: Runtime) -> str | None:
    """None when the upstream answers ``GET /health`` below 500; else why not."""
    if rt.upstream is None:
        return "not started"
    url = rt.options.upstream.rstrip("/") + "/health"
    try:
        async with asyncio.timeout(min(2.0, rt.options.connect_timeout or 2.0)):
            status = await rt.proxy.forwarder.get_status("/health")
    except TimeoutError:
        return f"upstream {_redact(url)} did not answer in time"
    except UpstreamError as exc:
        return f"upstream {_redact(url)} unreachable: {type(exc).__name__}: {exc}"
    if status >= 500:
        return f"upstream {_redact(url)} answered HTTP {status}"
    return None


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
    app = web.Application(client_max_size=1 << 20)
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

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=self.backlog)
        await site.start()
        addresses = self.runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        logs.event(log, "listening", host=self.host, port=self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, close the gate, drain in-flight requests, stop the loops."""
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as exc:
        logs.event(
            log,
            "listen_failed",
            logging.ERROR,
            host=settings.server.host,
            port=settings.server.port,
            error=str(exc),
        )
        await server.stop()
        return 1
    freeze_startup_objects()
    try:
        await stop.wait()
        logs.event(log, "signal_received")
    finally:
        await server.stop()
    return 0
