"""The engine loop: steps the engine model in scaled wall-clock time.

One asyncio task owns the :class:`~concur.sim.engine.EngineModel`. While the
engine has work it runs a step starting at the engine's current time ``t``,
sleeps until the wall time at which simulated time reaches the step's end
(``ScaledClock.wall_at(t + duration)``: an absolute target, so sleep overshoot
does not accumulate), then hands each request its new tokens and finishes the
requests that are done. The next step starts exactly at the previous one's end,
so the engine's own timeline is the offline simulator's; when the host cannot
keep up (steps shorter than the loop's overhead at high ``speed``), steps run
back to back until the loop catches up, and :attr:`EngineDriver.lag` says by
how much it is behind. When the engine runs out of work the task waits for a
request, and the engine's time jumps to the clock's ``now`` (idle time passes).

Handlers talk to the driver through :meth:`EngineDriver.submit` (returns a
:class:`RequestStream`) and :meth:`EngineDriver.abort` (a client went away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from concur import logs
from concur.sim.blocks import TokenSeq
from concur.sim.engine import EngineModel, EngineRequest, StepResult
from concur.sim.scheduler import FinishedRequest
from concur.sim.server.clock import ScaledClock

__all__ = ["EngineDriver", "EngineStopped", "RequestStream"]

log = logging.getLogger("concur.sim.server")


class EngineStopped(RuntimeError):
    """The engine loop stopped (server shutdown, or a bug in the engine model)."""


class RequestStream:
    """One request's view of the engine: its new tokens as they come, then its end."""

    __slots__ = (
        "_end",
        "_event",
        "_ready",
        "delivered",
        "error",
        "finished",
        "max_tokens",
        "prompt_tokens",
        "request_id",
    )

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.delivered = 0
        """Output tokens produced so far."""
        self.finished: FinishedRequest | None = None
        self.error: BaseException | None = None
        self._ready = 0
        self._event = asyncio.Event()  # set on new tokens, the end, or a failure
        self._end = asyncio.Event()  # set on the end or a failure

    @property
    def done(self) -> bool:
        """Finished, or failed: the engine no longer holds the request."""
        return self.finished is not None or self.error is not None

    async def next_tokens(self) -> int:
        """Wait for new output tokens; how many arrived since the last call.

        Returns 0 once the request has finished and every token was taken.
        Raises :class:`EngineStopped` if the engine stopped first.
        """
        while True:
            if self._ready:
                n, self._ready = self._ready, 0
                return n
            if self.error is not None:
                raise self.error
            if self.finished is not None:
                return 0
            self._event.clear()
            await self._event.wait()

    async def settle(self, seconds: float) -> None:
        """Wait up to ``seconds`` for more tokens to accumulate, returning early when
        the request finishes or fails (so coalescing never delays its end)."""
        if self.done or seconds <= 0:
            return
        self._end.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._end.wait()

    async def result(self) -> FinishedRequest:
        """Wait for the request to finish (tokens are not consumed)."""
        while self.finished is None:
            if self.error is not None:
                raise self.error
            self._event.clear()
            await self._event.wait()
        return self.finished

    # -- driver side ---------------------------------------------------------

    def _deliver(self, n: int) -> None:
        self.delivered += n
        self._ready += n
        self._event.set()

    def _finish(self, finished: FinishedRequest) -> None:
        self.finished = finished
        self._event.set()
        self._end.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._event.set()
        self._end.set()


class EngineDriver:
    """Runs ``engine`` in ``clock``'s scaled time and serves request streams.

    ``on_finish`` is called for every finished request when its last step ends,
    e.g. to update metrics.
    """

    def __init__(
        self,
        engine: EngineModel,
        clock: ScaledClock,
        *,
        on_finish: Callable[[FinishedRequest], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self._on_finish = on_finish
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next: float | None = None  # engine time of the next step while busy
        self._stopped: EngineStopped | None = None
        self.max_lag = 0.0
        """Largest lag seen (wall seconds)."""
        self.prompt_tokens_total = 0
        """Prompt tokens of requests that produced their first token (vLLM's counter)."""
        self.finished_total = 0
        self.aborted_total = 0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="concur-engine-driver")

    async def stop(self) -> None:
        """Stop the loop; requests still in the engine fail with :class:`EngineStopped`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(EngineStopped("the simulated engine is shutting down"))

    @property
    def healthy(self) -> bool:
        return self._task is not None and self._stopped is None

    # -- requests ------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt: TokenSeq,
        max_tokens: int,
        known_prefix_tokens: int = 0,
        priority: int = 0,
    ) -> RequestStream:
        """Queue a request; raises ValueError if the engine can never run it, and
        :class:`EngineStopped` if the loop is not running."""
        if self._stopped is not None:
            raise self._stopped
        if self._task is None:
            raise EngineStopped("the simulated engine is not running")
        req = EngineRequest(request_id, prompt, max_tokens, known_prefix_tokens, priority)
        self.engine.add_request(req, self.now())
        stream = RequestStream(request_id, len(prompt), max_tokens)
        self._streams[request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        """Drop a request the engine still holds (its client went away)."""
        stream = self._streams.pop(request_id, None)
        ok = self.engine.abort(request_id)
        if ok:
            self.aborted_total += 1
        if stream is not None and not stream.done:
            stream._fail(EngineStopped(f"request {request_id} was aborted"))
        return ok

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._streams)

    # -- time ----------------------------------------------------------------

    def now(self) -> float:
        """The engine's current simulated time: the clock's, but never past the
        end of the step in progress (when the loop runs behind)."""
        t = self.clock.now()
        nxt = self._next
        return nxt if nxt is not None and t > nxt else t

    @property
    def lag(self) -> float:
        """Wall seconds the engine is behind its schedule now (0 when on time or idle)."""
        if self._next is None:
            return 0.0
        return max(0.0, self.clock.wall() - self.clock.wall_at(self._next))

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logs.event(log, "engine_failed", logging.ERROR, error=repr(exc))
            self._stopped = EngineStopped(f"the simulated engine failed: {exc!r}")
            self._fail_all(self._stopped)
            raise

    async def _loop(self) -> None:
        engine = self.engine
        clock = self.clock
        while True:
            if not engine.has_work():
                self._next = None
                self._wake.clear()
                await self._wake.wait()
                continue
            start = self._next if self._next is not None else clock.now()
            res = engine.step(start)
            if res.duration <= 0:
                # Nothing schedulable (the model says only without work): do not spin.
                self._next = None
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), clock.to_wall(0.01) + 0.001)
                continue
            self._next = res.end
            delay = clock.wall_at(res.end) - clock.wall()
            if delay < 0 and -delay > self.max_lag:
                self.max_lag = -delay
            await asyncio.sleep(max(0.0, delay))
            self._deliver(res)

    def _deliver(self, res: StepResult) -> None:
        streams = self._streams
        for rid, n in res.outputs.items():
            stream = streams.get(rid)
            if stream is not None:
                if stream.delivered == 0:
                    self.prompt_tokens_total += stream.prompt_tokens
                stream._deliver(n)
        for fin in res.finished:
            self.finished_total += 1
            stream = streams.pop(fin.request_id, None)
            if stream is not None:
                stream._finish(fin)
            if self._on_finish is not None:
                self._on_finish(fin)

    def _fail_all(self, error: EngineStopped) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)
