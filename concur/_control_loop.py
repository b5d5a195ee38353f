"""The control loop of ``concur serve``, and what it and the gate report.

A background task ticks the :class:`~concur.control.Controller` every
``control.interval`` seconds with the poller's latest engine signal. The gate's
events (admissions, pauses, ends, ...) and the ticks become metrics and log lines
here, in one place for the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from concur import logs
from concur.admission import AdmissionGate, GateEvent
from concur.control import Controller, TickRecord
from concur.metrics import ConcurMetrics
from concur.poller import Poller

log = logging.getLogger("concur.app")

HELD = frozenset({"confirm", "draining", "cooldown"})
"""Decisions that see congestion and hold the window: logged as ``held`` as each begins,
so that a log shows why a high reading did not cut."""


class ControlLoop:
    """Ticks ``controller`` every ``interval`` seconds (on ``clock``) while started."""

    def __init__(
        self,
        controller: Controller,
        poller: Poller,
        metrics: ConcurMetrics,
        *,
        clock: Callable[[], float],
        interval: float,
    ) -> None:
        self.controller = controller
        self.gate: AdmissionGate = controller.gate
        self.poller = poller
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._last_reason: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="concur-control")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        interval = self.interval
        while True:
            now = self.clock()
            try:
                self.controller.tick(now, self.poller.signal, stale=self.poller.is_stale(now))
            except Exception:  # a bug in a policy must not stop admission control
                log.exception("control tick failed")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ reports

    def on_gate_event(self, event: GateEvent) -> None:
        """The gate's ``on_event``: a metric and a log line (debug for held/released)."""
        self.metrics.on_gate_event(event)
        gate = self.gate
        level = logging.DEBUG if event.kind in ("held", "released") else logging.INFO
        logs.event(
            log,
            "admission",
            level,
            outcome=event.kind,
            agent=event.agent_id,
            waited=None if event.waited is None else round(event.waited, 4),
            detail=event.detail or None,
            window=gate.window,
            live=gate.live,
            queued=gate.queued,
        )

    def on_tick(self, record: TickRecord) -> None:
        """The controller's ``on_tick``: a metric, and a log line when the window moved
        (``window``) or when congestion begins to be held (``held``: see :data:`HELD`)."""
        self.metrics.on_tick(record)
        obs, dec = record.observation, record.decision
        begins = dec.reason != self._last_reason
        self._last_reason = dec.reason
        if record.window_before != dec.window:
            name = "window"
        elif begins and dec.reason in HELD:
            name = "held"
        else:
            return
        logs.event(
            log,
            name,
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
