"""Admit: the second layer of the request path (inspect, admit, forward, relay).

An agent step waits at the gate for a :class:`Permit`, runs inside it, and the
permit is released on every path: response relayed, upstream failure, client gone,
cancellation while queued or while running (as tower's permits, which travel with the
request and are dropped with it). A step the gate will not let through gets its
HTTP answer from :func:`refusal`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from types import TracebackType
from typing import Any

from aiohttp import web

from concur import logs
from concur._budget import OverBudget
from concur._errors import openai_error
from concur.admission import (
    AdmissionError,
    AdmissionGate,
    AgentEnded,
    GateClosed,
    QueueFull,
    QueueTimeout,
    Ticket,
    TicketStatus,
)
from concur.metrics import ConcurMetrics

log = logging.getLogger("concur.proxy")


class Permit:
    """``async with Permit(gate, agent) as ticket:`` one request of ``agent`` runs inside.

    Entering waits until the gate grants the request (at once for an admitted agent's
    usual step: no suspension then) and raises :class:`~concur.admission.QueueFull`,
    :class:`~concur.admission.QueueTimeout` (after ``max_queue_wait`` queued or held),
    :class:`~concur.admission.AgentEnded` or :class:`~concur.admission.GateClosed`;
    cancelled while waiting, it leaves no trace in the gate. Leaving finishes the
    ticket; set ``ticket.usage_tokens`` before to record the agent's context size.
    Cancelled inside (the client hung up: aiohttp cancels the handler), or with
    ``ticket.client_gone`` set, the agent's disconnect grace starts
    (``admission.disconnect_grace``): unless it sends again, its slot is freed.
    """

    __slots__ = ("_context_tokens", "_done", "_gate", "agent_id", "ticket")

    def __init__(
        self, gate: AdmissionGate, agent_id: str, *, context_tokens: int = 0, done: bool = False
    ) -> None:
        self._gate = gate
        self.agent_id = agent_id
        self._context_tokens = context_tokens
        self._done = done
        self.ticket: Ticket | None = None

    async def acquire(self) -> Ticket:
        """Wait for the grant; what entering the ``async with`` does."""
        gate = self._gate
        ticket = gate.submit(self.agent_id, context_tokens=self._context_tokens, done=self._done)
        if ticket.granted:  # the usual step of an admitted agent: nothing to wait for
            self.ticket = ticket
            return ticket
        # The wait, here rather than in a coroutine of its own: a thousand queued
        # requests each keep one frame less. Not resolved yet, and nothing can resolve
        # the ticket before this callback is set.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: Ticket) -> None:
            if not fut.done():
                fut.set_result(None)

        ticket.on_resolve = wake
        timeout = gate.max_queue_wait if (ticket.new_agent or ticket.held) else None
        # One timer handle rather than asyncio.wait_for's task machinery: a thousand
        # queued requests each keep what they wait with.
        deadline: asyncio.TimerHandle | None = None
        if timeout is not None:

            def expire() -> None:
                if not fut.done():
                    fut.set_exception(TimeoutError())

            deadline = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            await fut
        except TimeoutError:
            if not ticket.granted:
                raise gate.timed_out(ticket) from None
        except BaseException:
            gate.abandon(ticket)
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        if ticket.status is TicketStatus.REJECTED:
            assert ticket.error is not None
            raise ticket.error
        self.ticket = ticket
        return ticket

    __aenter__ = acquire

    def release(self) -> None:
        """Finish the granted request (idempotent)."""
        if self.ticket is not None:
            self._gate.finish(self.ticket)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ticket = self.ticket
        if (
            ticket is not None
            and exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
        ):
            ticket.client_gone = True
        self.release()


def refusal(
    exc: AdmissionError, agent_id: str | None, rid: str, metrics: ConcurMetrics
) -> web.Response:
    """The answer to a step the gate refused: 429 (queue full or timed out, with
    ``Retry-After``), 503 (shutting down, or held bodies over their budget, with
    ``Retry-After``), 409 (its agent was ended)."""
    fields: dict[str, Any] = {"request_id": rid, "agent": agent_id, "reason": exc.reason}
    if isinstance(exc, OverBudget):
        metrics.on_admission("overloaded")
        logs.event(log, "request_rejected", status=503, **fields)
        return openai_error(
            503, str(exc), type_="server_error", code=exc.reason, headers=_retry_after(exc)
        )
    if isinstance(exc, QueueFull | QueueTimeout):
        logs.event(log, "request_rejected", status=429, **fields)
        return openai_error(
            429, str(exc), type_="rate_limit_error", code=exc.reason, headers=_retry_after(exc)
        )
    if isinstance(exc, GateClosed):
        metrics.on_admission("closed")
        logs.event(log, "request_rejected", status=503, **fields)
        return openai_error(
            503, str(exc), type_="server_error", code=exc.reason, headers={"Retry-After": "1"}
        )
    if isinstance(exc, AgentEnded):
        logs.event(log, "request_rejected", status=409, **fields)
        return openai_error(409, str(exc), type_="invalid_request_error", code=exc.reason)
    logs.event(log, "request_rejected", status=503, **fields)
    return openai_error(503, str(exc), type_="server_error", code=exc.reason)


def _retry_after(exc: OverBudget | QueueFull | QueueTimeout) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1, from the refusal's own advice."""
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after or 1.0)))}
