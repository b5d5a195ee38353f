"""One control step, shared by the proxy and the simulator.

Each tick: take the latest engine signal, derive per-interval rates, build the
policy's :class:`~concur.policies.base.Observation` from the signal and the
gate, ask the policy, apply its decision to the gate, reap idle agents. The
proxy calls :meth:`Controller.tick` from a background task on wall-clock time;
the simulator calls it from a virtual-clock event. Nothing here awaits.

When the signal is stale (the engine's metrics are unreachable or broken),
the policy is not consulted and ``failure_mode`` decides:

``hold``
    keep the window as it is (the default: neither flood nor starve the engine);
``closed``
    admit no new agents (admitted agents carry on);
``open``
    no limit, as if concur were not there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from concur.adapters.rates import Rates, derive
from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate, GateView, Pace
from concur.policies.base import Decision, Observation, Policy, Resumable

FailureMode = Literal["hold", "closed", "open"]


@dataclass(frozen=True, slots=True)
class TickRecord:
    """What one tick saw and decided: for status pages, logs, metrics and plots."""

    now: float
    observation: Observation
    decision: Decision
    window_before: int | None
    stale: bool


class Controller:
    """Drives an :class:`AdmissionGate` with a :class:`Policy`."""

    def __init__(
        self,
        policy: Policy,
        gate: AdmissionGate,
        *,
        failure_mode: FailureMode = "hold",
        on_tick: Callable[[TickRecord], None] | None = None,
    ) -> None:
        self.policy = policy
        self.gate = gate
        self.failure_mode: FailureMode = failure_mode
        self.on_tick = on_tick
        self.last: TickRecord | None = None
        self._prev: EngineSignal | None = None
        self._rates = Rates(hit_rate=None, new_preemptions=None, reset=False)
        self._capacity: int | None = None
        self._pace: tuple[float, Pace] | None = None
        gate.window = policy.initial_window()

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy live. The gate keeps its agents; a policy that learns its window
        (:class:`Resumable`, e.g. aimd) continues from the one in force, any other starts
        from its initial window; the next tick decides as usual."""
        self.policy = policy
        if isinstance(policy, Resumable):
            self.gate.window = policy.resume_from(self.gate.window, self.gate.live)
        else:
            self.gate.window = policy.initial_window()

    def observe(self, now: float, signal: EngineSignal | None, stale: bool) -> Observation:
        """Build the policy's observation for a tick. A new reading also advances the
        interval rates (new preemptions, hit rate), so call it once per tick, as
        :meth:`tick` does; status pages read :attr:`last` instead."""
        usable = signal if (signal is not None and not stale) else None
        if usable is not None:
            if self._prev is None or usable.timestamp != self._prev.timestamp:
                self._rates = derive(self._prev, usable)
                self._prev = usable
                new_preemptions = self._rates.new_preemptions
            else:
                new_preemptions = 0.0  # already counted at the tick that saw this reading
            if usable.kv_capacity_tokens is not None:
                self._capacity = usable.kv_capacity_tokens
        view: GateView = self.gate.view()
        pace = view.pace
        then, last = self._pace or (now, pace)  # the first tick has no interval behind it
        self._pace = (now, pace)
        span = now - then
        ended = pace.requests - last.requests
        tools = pace.tools - last.tools
        return Observation(
            now=now,
            window=view.window,
            live=view.live,
            paused=view.paused,
            queued=view.queued,
            kv_usage=usable.kv_usage if usable else None,
            hit_rate=self._rates.hit_rate if usable else None,
            new_preemptions=new_preemptions if usable else None,
            engine_running=usable.running if usable else None,
            engine_waiting=usable.waiting if usable else None,
            capacity_tokens=self._capacity,
            live_tokens=view.live_tokens,
            growth_tokens=view.growth_tokens,
            step_growth_tokens=view.step_growth_tokens,
            live_contexts_newest_first=view.live_contexts_newest_first,
            candidate_contexts=view.candidate_contexts,
            stale=usable is None,
            interval_s=span or None,
            busy=min(1.0, (pace.busy_s - last.busy_s) / span) if span > 0 else None,
            completed=ended,
            latency_s=(pace.latency_s - last.latency_s) / ended if ended else None,
            tool_s=(pace.tool_s - last.tool_s) / tools if tools else None,
        )

    def tick(self, now: float, signal: EngineSignal | None, *, stale: bool = False) -> TickRecord:
        """One control step at time ``now``."""
        obs = self.observe(now, signal, stale)
        decision = self._failure(obs) if obs.stale else self.policy.decide(obs)
        before = self.gate.window
        self.gate.apply(
            decision.window,
            pause=decision.pause,
            hold_requests=decision.hold_requests,
            release_limit=decision.release_limit,
            admit_new=decision.admit_new,
        )
        self.gate.reap()
        record = TickRecord(now, obs, decision, before, obs.stale)
        self.last = record
        if self.on_tick is not None:
            self.on_tick(record)
        return record

    def _failure(self, obs: Observation) -> Decision:
        mode = self.failure_mode
        if mode == "open":
            window: int | None = None
        elif mode == "closed":
            window = obs.live if obs.window is None else min(obs.window, obs.live)
        else:
            window = obs.window
        return Decision(
            window=window, reason=f"stale:{mode}", release_limit=None, admit_new=mode != "closed"
        )
