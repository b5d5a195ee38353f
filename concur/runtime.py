"""One running proxy's parts, wired from :class:`~concur.config.Settings`, and their lifecycle.

:class:`Runtime` builds the gate, the controller (with its policy), the engine
poller, the metrics registry and the request path (:class:`~concur.proxy.Proxy`);
the control loop (``concur._control_loop``), the views (``concur._views``) and the
admin side (``concur._admin``) work on these parts. :func:`concur.app.build_app`
puts a runtime in an aiohttp application, which starts and stops it.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from concur import _priority, logs
from concur._admin import Admin
from concur._control_loop import ControlLoop
from concur._forward import make_upstream
from concur._views import redact
from concur.adapters.registry import get_adapter
from concur.admission import AdmissionGate
from concur.config import Settings, tls_context
from concur.control import Controller
from concur.identity import IdentitySource
from concur.metrics import ConcurMetrics
from concur.policies import build_policy
from concur.poller import Poller
from concur.proxy import Proxy, ProxyOptions
from concur.upstream import Upstream

log = logging.getLogger("concur.app")

Clock = Callable[[], float]


def proxy_options(settings: Settings) -> ProxyOptions:
    up, adm = settings.upstream, settings.admission
    return ProxyOptions(
        upstream=up.url,
        connect_timeout=up.connect_timeout,
        first_byte_timeout=up.first_byte_timeout,
        read_timeout=up.read_timeout,
        send_timeout=settings.server.send_timeout,
        max_body_bytes=settings.server.max_body_bytes,
        max_held_bytes=settings.server.max_held_bytes,
        identity=tuple(IdentitySource(kind, name) for kind, name in adm.identity_sources()),
        max_identity_bytes=adm.max_identity_bytes,
        anonymous=adm.anonymous,
        done_header=adm.done_header,
        ssl_context=tls_context(up.ca_file),
        framing=up.framing,
        keepalive=up.keepalive,
        max_connections=up.max_connections,
        engine_priority=_priority.enabled(adm.engine_priority, settings.engine.kind),
    )


def make_poller(
    settings: Settings, clock: Clock, ssl_context: ssl.SSLContext | None = None
) -> Poller:
    """The engine poller, from ``engine.*``, scraping :meth:`Settings.metrics_url`;
    ``ssl_context`` is the upstream client's, so ``upstream.ca_file`` is read once."""
    adapter = get_adapter(settings.engine.kind)
    url = settings.metrics_url()
    # The poller takes the engine's root and adds the adapter's path itself.
    base = url.removesuffix(adapter.metrics_path)
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
        self.gate = AdmissionGate(clock=clock, **settings.gate_options())
        self.controller = Controller(
            build_policy(None, settings.policy),
            self.gate,
            failure_mode=settings.control.failure_mode,
        )
        self.options = proxy_options(settings)
        self.poller = (
            poller if poller is not None else make_poller(settings, clock, self.options.ssl_context)
        )
        self.control = ControlLoop(
            self.controller,
            self.poller,
            self.metrics,
            clock=clock,
            interval=settings.control.interval,
        )
        self.gate.on_event = self.control.on_gate_event
        self.controller.on_tick = self.control.on_tick
        self.admin = Admin(settings.server.admin_token, self.controller, settings.policy)
        self.upstream: Upstream | None = None
        # Built now so the application can route to its handler directly; it gets its
        # upstream client (whose connections need the running loop) in start().
        self.proxy = Proxy(self.options, self.gate, self.metrics)
        self.metrics.overload.proxy = self.proxy
        self.started_at = clock()
        self.shutting_down = False

    async def start(self) -> None:
        opts = self.options
        self.upstream = self.proxy.upstream = make_upstream(
            opts.upstream,
            opts.connect_timeout,
            opts.ssl_context,
            opts.framing,
            keepalive=opts.keepalive,
            max_connections=opts.max_connections,
        )
        self.poller.start()
        self.control.start()
        logs.event(
            log,
            "started",
            upstream=redact(opts.upstream),
            metrics_url=redact(self.poller.url),
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
        await self.control.stop()
        await self.poller.stop()
        if self.upstream is not None:
            await self.upstream.close()
        logs.event(log, "stopped", active=self.gate.active, queued=self.gate.queued)
