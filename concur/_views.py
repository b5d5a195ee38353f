"""What ``concur serve`` shows of itself: status, agents, gauges, readiness.

Each view is a typed snapshot built from the runtime's parts; the handlers turn
them into JSON (:meth:`Status.to_json`, :meth:`AgentRow.to_json`) and the
``/metrics`` scrape into gauges (:func:`gauges`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from yarl import URL

from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate, AgentState, WaitReason
from concur.metrics import GaugeValues
from concur.upstream import UpstreamError

if TYPE_CHECKING:
    from concur.runtime import Runtime


def redact(url: str) -> str:
    """A URL without its user:password part, for status pages and logs."""
    u = URL(url)
    return str(u.with_user(None)) if u.user or u.password else url


def _signal_dict(sig: EngineSignal | None) -> dict[str, Any] | None:
    if sig is None:
        return None
    out = asdict(sig)
    out.pop("timestamp", None)
    return out


@dataclass(frozen=True, slots=True)
class Status:
    """``GET /concur/status``: the window, the agents, the engine signal, the policy."""

    window: int | None
    active: int
    live: int
    paused: int
    queued: int
    held: int
    in_flight: int
    live_tokens: int
    pressure: float | None
    pressure_parts: dict[str, float | None]
    decision: str | None
    last_tick_age_seconds: float | None
    hit_rate: float | None
    capacity_tokens: int | None
    signal: dict[str, Any] | None
    signal_age_seconds: float | None
    stale: bool
    poll_error: str | None
    policy: dict[str, object]
    failure_mode: str
    queue_reason: str | None
    """Why new agents wait now (None: none does): window full, engine stale, ..."""
    waiting: dict[str, int]
    """What waits, by reason: queued agents under window_full, engine_stale,
    admission_paused, resuming_first or release_pace; paused agents; held requests
    (see ``concur._waits``)."""
    upstream: str
    shutting_down: bool
    uptime_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _waiting(gate: AdmissionGate, queue: WaitReason | None) -> dict[str, int]:
    """Queued agents under their reason's code, paused agents, held requests."""
    counts = {"paused": gate.paused, "held": gate.held}
    if queue is not None:
        counts[queue.code] = gate.queued
    return {code: n for code, n in sorted(counts.items()) if n}


def status(rt: Runtime) -> Status:
    now = rt.clock()
    view = rt.gate.view()
    queue = rt.gate.queue_reason()
    last = rt.controller.last
    poller = rt.poller
    return Status(
        window=view.window,
        active=view.active,
        live=view.live,
        paused=view.paused,
        queued=view.queued,
        held=view.held,
        in_flight=rt.proxy.in_flight,
        live_tokens=view.live_tokens,
        pressure=last.decision.pressure if last else None,
        pressure_parts=dict(last.decision.parts) if last else {},
        decision=last.decision.reason if last else None,
        last_tick_age_seconds=None if last is None else now - last.now,
        hit_rate=last.observation.hit_rate if last else None,
        capacity_tokens=last.observation.capacity_tokens if last else None,
        signal=_signal_dict(poller.signal),
        signal_age_seconds=poller.age(now),
        stale=poller.is_stale(now),
        poll_error=poller.last_error,
        policy=rt.controller.policy.describe(),
        failure_mode=rt.controller.failure_mode,
        queue_reason=None if queue is None else queue.detail,
        waiting=_waiting(rt.gate, queue),
        upstream=redact(rt.options.upstream),
        shutting_down=rt.shutting_down,
        uptime_seconds=now - rt.started_at,
    )


@dataclass(frozen=True, slots=True)
class AgentRow:
    """One admitted or queued agent, for ``GET /concur/agents``."""

    id: str
    state: str
    since: str
    """When it entered its state (ISO 8601, seconds)."""
    in_state_seconds: float
    idle_seconds: float
    requests: int
    in_flight: int
    pending: int
    context_tokens: int
    ending: bool
    idle_timeout_seconds: float | None
    """How long it may stay idle now before its slot is freed: adapted to its longest
    pause so far (longest_pause_seconds), within admission.idle_timeout_min and
    admission.idle_timeout."""
    longest_pause_seconds: float | None
    hung_up_seconds: float | None
    """Seconds since its client hung up mid-request (None: it did not); its slot is
    freed admission.disconnect_grace after, unless it sends again."""
    waiting_for: str | None
    """Why it (or a request of it) waits, as a code (see Status.waiting); None: it does not."""
    why: str | None
    """The same, in a sentence."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def agents(rt: Runtime) -> list[AgentRow]:
    """Admitted agents in admission order, then queued ones in queue order."""
    now = rt.clock()
    wall = time.time()

    def iso(t: float) -> str:
        return datetime.fromtimestamp(wall - (now - t), tz=UTC).isoformat(timespec="seconds")

    gate = rt.gate
    rows = []
    for a in gate.agents():
        limit = gate.idle_limit(a) if a.state is not AgentState.QUEUED else None
        why = gate.waiting_for(a)
        rows.append(
            AgentRow(
                id=a.agent_id,
                state=str(a.state),
                since=iso(a.since),
                in_state_seconds=round(now - a.since, 3),
                idle_seconds=round(now - a.last_seen, 3),
                requests=a.requests,
                in_flight=a.in_flight,
                pending=len(a.pending),
                context_tokens=a.context_tokens,
                ending=a.ending,
                idle_timeout_seconds=None if limit is None else round(limit, 3),
                longest_pause_seconds=_round(a.longest_pause),
                hung_up_seconds=None if a.gone_at is None else round(now - a.gone_at, 3),
                waiting_for=None if why is None else why.code,
                why=None if why is None else why.detail,
            )
        )
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def gauges(rt: Runtime) -> GaugeValues:
    """The gauges' values for a ``/metrics`` scrape."""
    st = status(rt)
    sig = rt.poller.signal
    return GaugeValues(
        window=st.window,
        active=st.active,
        live=st.live,
        paused=st.paused,
        queued=st.queued,
        pressure=st.pressure,
        kv_usage=None if sig is None else sig.kv_usage,
        hit_rate=st.hit_rate,
        signal_age=st.signal_age_seconds,
        parts=st.pressure_parts,
    )


async def unready(rt: Runtime) -> list[str]:
    """Why concur is not ready to serve (``GET /readyz``); empty when it is."""
    reasons: list[str] = []
    if rt.shutting_down:
        reasons.append("shutting down")
    now = rt.clock()
    poller = rt.poller
    if poller.signal is None:
        reasons.append(f"no engine signal yet from {redact(poller.url)}")
    elif poller.is_stale(now):
        age = poller.age(now) or 0.0
        reasons.append(
            f"engine signal is stale ({age:.1f}s old > engine.stale_after "
            f"{poller.stale_after:g}s); last error: {poller.last_error}"
        )
    problem = await _probe_upstream(rt)
    if problem is not None:
        reasons.append(problem)
    return reasons


async def _probe_upstream(rt: Runtime) -> str | None:
    """None when the upstream answers ``GET /health`` below 500; else why not."""
    if rt.upstream is None:
        return "not started"
    url = rt.options.upstream.rstrip("/") + "/health"
    try:
        async with asyncio.timeout(min(2.0, rt.options.connect_timeout or 2.0)):
            code = await rt.proxy.forwarder.get_status("/health")
    except TimeoutError:
        return f"upstream {redact(url)} did not answer in time"
    except UpstreamError as exc:
        return f"upstream {redact(url)} unreachable: {type(exc).__name__}: {exc}"
    if code >= 500:
        return f"upstream {redact(url)} answered HTTP {code}"
    return None
