"""The engine poller: keeps the latest good engine signal fresh.

A :class:`Poller` is a background asyncio task that GETs the engine's state
page every ``poll_interval`` seconds (it sleeps until the next poll is due, so
polls *start* at that rate however long each takes), parses it with the
engine's adapter and keeps the latest good :class:`EngineSignal`. It never
crashes on what the engine answers: refused connections, timeouts, 5xx pages
and garbage all become :attr:`Poller.last_error`, the previous good signal is
kept (and ages until :meth:`Poller.is_stale`), and polling backs off
exponentially while the failures last (``poll_interval x 2^n``, capped at
``max_backoff``).

Logging is per state change, never per poll: the first failure after a good
reading (or at start) logs one warning, the first success after failures logs
one recovery, the very first reading logs once at info.

Signals are stamped with the injected clock when the request is sent, so their
age includes the request's latency (the conservative choice for staleness).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import ssl
import time
from collections.abc import Callable

import httpx

from concur import logs
from concur.adapters.errors import AdapterError
from concur.adapters.registry import Adapter, metrics_url, scrape
from concur.adapters.signal import EngineSignal

Clock = Callable[[], float]

_LOG = logging.getLogger(__name__)


class PollState(enum.Enum):
    """Where the poller stands; logs are written on changes only."""

    STARTING = "starting"
    """No poll has finished yet."""
    OK = "ok"
    """The last poll produced a signal."""
    FAILING = "failing"
    """The last poll failed; see :attr:`Poller.last_error`."""


class Poller:
    """Polls one engine and keeps its latest good signal.

    Args:
        base_url: the engine server's root, e.g. ``http://127.0.0.1:8000``.
        adapter: how to read the engine (see :func:`concur.adapters.get_adapter`).
        client: the HTTP client to use; by default the poller makes (and closes)
            its own, which ignores proxy environment variables.
        poll_interval: seconds between the starts of two polls while they succeed.
        timeout: seconds one request may take.
        stale_after: a signal older than this (on ``clock``) is stale.
        max_backoff: cap, in seconds, of the delay between failing polls.
        clock: the time source for timestamps and ages (``time.monotonic``).
        logger: where state changes are logged (``concur.poller``).
        ssl_context: TLS for an https engine when the poller makes its own client
            (None: httpx's default CAs).
    """

    def __init__(
        self,
        base_url: str,
        adapter: Adapter,
        *,
        client: httpx.AsyncClient | None = None,
        poll_interval: float = 0.5,
        timeout: float = 2.0,
        stale_after: float = 3.0,
        max_backoff: float = 5.0,
        clock: Clock = time.monotonic,
        logger: logging.Logger | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        _check_positive("poll_interval", poll_interval)
        _check_positive("timeout", timeout)
        _check_positive("stale_after", stale_after)
        _check_positive("max_backoff", max_backoff)
        if max_backoff < poll_interval:
            raise ValueError(
                f"max_backoff ({max_backoff:g} s) is shorter than poll_interval "
                f"({poll_interval:g} s); set max_backoff >= poll_interval"
            )
        self.base_url = base_url
        self.adapter = adapter
        self.url = metrics_url(base_url, adapter)
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.stale_after = stale_after
        self.max_backoff = max_backoff
        self._clock = clock
        self._log = logger or _LOG
        self._ssl = ssl_context
        self._owns_client = client is None
        self._client = client if client is not None else self._new_client()
        self._task: asyncio.Task[None] | None = None
        self._signal: EngineSignal | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._failing_since: float | None = None
        self._state = PollState.STARTING

    # -- what the rest of concur reads ---------------------------------------------

    @property
    def signal(self) -> EngineSignal | None:
        """The latest good signal (kept while polls fail), or None before the first."""
        return self._signal

    @property
    def taken_at(self) -> float | None:
        """When :attr:`signal` was requested, on the poller's clock."""
        return None if self._signal is None else self._signal.timestamp

    @property
    def last_error(self) -> str | None:
        """Why the last poll failed; None when it succeeded (or none has run)."""
        return self._last_error

    @property
    def state(self) -> PollState:
        """Starting, ok or failing (by the last poll)."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether the background task is alive."""
        return self._task is not None and not self._task.done()

    def age(self, now: float | None = None) -> float | None:
        """Seconds since :attr:`signal` was taken (``now`` defaults to the clock); None if none."""
        taken_at = self.taken_at
        if taken_at is None:
            return None
        return (self._clock() if now is None else now) - taken_at

    def is_stale(self, now: float | None = None) -> bool:
        """True without a signal, or when it is older than ``stale_after``."""
        age = self.age(now)
        return age is None or age > self.stale_after

    def next_delay(self) -> float:
        """Seconds until the next poll: the interval, or the backoff while failing."""
        if self._failures == 0:
            return self.poll_interval
        return min(self.max_backoff, self.poll_interval * 2.0 ** min(self._failures, 32))

    # -- polling ---------------------------------------------------------------------

    async def poll_once(self) -> EngineSignal | None:
        """Poll the engine once; the new signal, or None (see :attr:`last_error`).

        Never raises, except ``asyncio.CancelledError``.
        """
        try:
            signal = await scrape(
                self._client,
                self.base_url,
                self.adapter,
                self._clock(),
                request_timeout=self.timeout,
            )
        except AdapterError as exc:
            self._failed(str(exc))
            return None
        except Exception as exc:  # a bug must not stop the poller; say what happened
            self._failed(f"GET {self.url}: unexpected {type(exc).__name__}: {exc}")
            return None
        self._succeeded(signal)
        return signal

    def start(self) -> None:
        """Start polling in the background (no-op when already running)."""
        if self.running:
            return
        if self._owns_client and self._client.is_closed:
            self._client = self._new_client()
        self._task = asyncio.create_task(self._run(), name=f"concur-poller {self.url}")

    async def stop(self) -> None:
        """Stop polling and close the client if the poller made it. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_client:
            await self._client.aclose()

    async def _run(self) -> None:
        # One timer wake-up per poll: sleep until the next poll is due, poll_interval
        # after the last one started (at most one start per interval, however long a
        # poll takes), or for the backoff while polls fail. asyncio-throttle's Throttler
        # re-checks its slot every retry_interval instead (10 ms: ~1% of a core idle).
        interval = self.poll_interval
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll_once()
            if self._failures:
                await asyncio.sleep(self.next_delay())
            else:
                await asyncio.sleep(max(0.0, started + interval - loop.time()))

    # -- state changes -------------------------------------------------------------

    def _succeeded(self, signal: EngineSignal) -> None:
        previous, failures = self._state, self._failures
        self._signal = signal
        self._last_error = None
        self._failures = 0
        self._state = PollState.OK
        if previous is PollState.FAILING:
            down_for = None if self._failing_since is None else self._clock() - self._failing_since
            logs.event(
                self._log,
                "engine_poll_recovered",
                logging.INFO,
                url=self.url,
                failed_polls=failures,
                down_for_s=down_for,
            )
        elif previous is PollState.STARTING:
            logs.event(
                self._log,
                "engine_poll_ok",
                logging.INFO,
                url=self.url,
                kind=self.adapter.kind,
                engines=signal.engines,
            )
        self._failing_since = None

    def _failed(self, error: str) -> None:
        self._last_error = error
        self._failures += 1
        if self._state is PollState.FAILING:
            return
        self._state = PollState.FAILING
        self._failing_since = self._clock()
        logs.event(
            self._log,
            "engine_poll_failing",
            logging.WARNING,
            url=self.url,
            error=error,
            keeping_signal_from=self.taken_at,
            stale_after_s=self.stale_after,
        )

    def _new_client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = self._ssl if self._ssl is not None else True
        return httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=True, trust_env=False, verify=verify
        )


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
