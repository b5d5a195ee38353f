"""Why an agent waits: a short code and a sentence, for 429s, status pages and logs.

An agent's request waits at the gate for one of a few reasons, which the client
and the operator should see rather than guess:

``window_full``
    a new agent: every slot of the window is live;
``engine_stale``
    a new agent: the engine's metrics are stale and ``control.failure_mode`` holds
    the window (``hold``) or admits no one (``closed``);
``admission_paused``
    a new agent: the policy admits no new agent now;
``resuming_first``
    a new agent: paused agents resume before any new one is admitted;
``release_pace``
    a new agent: a slot is free and it is next; the policy releases a few per tick;
``paused``
    an admitted agent paused by the policy at its step boundary (pressure high);
``held``
    an admitted agent's request held by a request-level policy (``epp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from concur._gate_model import Agent, AgentState, QueueFull, QueueTimeout

if TYPE_CHECKING:
    from concur._gate_views import GateViews as AdmissionGate


@dataclass(frozen=True, slots=True)
class WaitReason:
    code: str
    detail: str

    def __str__(self) -> str:
        return self.detail


def _stale_mode(reason: str) -> str | None:
    return reason.removeprefix("stale:") if reason.startswith("stale:") else None


def _slots(gate: AdmissionGate) -> str:
    return f"{gate.live} of {gate.window} slots live"


def why_queued(gate: AdmissionGate) -> WaitReason:
    """Why the gate's new (queued) agents wait now."""
    reason = gate.reason
    stale = _stale_mode(reason)
    if not gate.admit_new:
        if stale is not None:
            return WaitReason(
                "engine_stale",
                f"the engine's metrics are stale and control.failure_mode is {stale}: "
                "no new agent is admitted until they are fresh again",
            )
        return WaitReason(
            "admission_paused", f"the policy admits no new agent now ({reason or 'closed'})"
        )
    if gate.paused:
        return WaitReason(
            "resuming_first",
            f"{gate.paused} paused agent(s) resume before any new agent is admitted",
        )
    if gate.window is not None and gate.live >= gate.window:
        if stale is not None:
            return WaitReason(
                "engine_stale",
                f"the window is full ({_slots(gate)}) and held there while the engine's "
                f"metrics are stale (control.failure_mode is {stale})",
            )
        return WaitReason(
            "window_full",
            f"the window is full ({_slots(gate)}); a slot frees when an agent ends "
            "(its done step, or idle) or the policy grows the window",
        )
    return WaitReason(
        "release_pace", "a slot is free; the policy admits a few new agents per control tick"
    )


def why_waiting(gate: AdmissionGate, agent: Agent) -> WaitReason | None:
    """Why ``agent`` (or a request of it) waits now; None if nothing of it waits."""
    if agent.state is AgentState.QUEUED:
        return why_queued(gate)
    if agent.state is AgentState.PAUSED:
        return WaitReason(
            "paused",
            f"paused by the policy at its step boundary ({gate.reason or 'pressure high'}): "
            "the live agents' contexts fill the engine's cache; it resumes when pressure "
            "falls, before any new agent",
        )
    if gate.holds(agent):
        return held(gate)
    return None


def held(gate: AdmissionGate) -> WaitReason:
    """Why a request held by request-level gating waits."""
    return WaitReason(
        "held",
        f"held by the policy's request-level gate ({gate.reason or 'engine busy'}); "
        "released when the engine has room",
    )


def queue_full(gate: AdmissionGate, limit: int) -> QueueFull:
    """The error for a new agent that finds ``limit`` agents already waiting."""
    err = QueueFull(
        f"the admission queue is full ({limit} agents waiting, admission.max_queue_len) "
        f"because {why_queued(gate)}; retry later"
    )
    err.retry_after = gate.retry_after
    return err


def queue_timeout(
    gate: AdmissionGate, waited: float, why: WaitReason | None, *, new_agent: bool
) -> QueueTimeout:
    """The error for a request that waited ``waited`` seconds (``max_queue_wait``)."""
    slot = "an agent slot" if new_agent else "a request slot"
    err = QueueTimeout(
        f"waited {waited:.1f}s for {slot} (admission.max_queue_wait) because "
        f"{why or 'the engine is at capacity'}; retry later"
    )
    err.retry_after = gate.retry_after
    return err
