"""One control step, shared by the proxy and the simulator.

Each tick: take the latest engine signal and its per-interval rates
(:class:`~concur.adapters.rates.IntervalRates`), read the gate and the features
learned from it (``concur._features``: context growth, the interval's pace), build
the policy's :class:`~concur.policies.base.Observation`, ask the policy, apply its
decision to the gate, reap idle agents. The
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

from concur._features import GrowthFeatures, PaceFeatures
from concur.adapters.rates import IntervalRates
from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate
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
    """Drives an :class:`AdmissionGate` with a :class:`Policy`.

    It becomes the gate's :attr:`~AdmissionGate.observer` (for the growth features):
    build it with the gate, before the first request.
    """

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
        self.growth = GrowthFeatures()
        self._rates = IntervalRates()
        self._pace = PaceFeatures()
        gate.observer = self.growth
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
        rates = self._rates.update(usable) if usable is not None else None
        view = self.gate.view()
        growth = self.growth.project(view)
        interval = self._pace.interval(now, view.pace)
        return Observation(
            now=now,
            window=view.window,
            live=view.live,
            paused=view.paused,
            queued=view.queued,
            kv_usage=usable.kv_usage if usable else None,
            hit_rate=rates.hit_rate if rates else None,
            new_preemptions=rates.new_preemptions if rates else None,
            engine_running=usable.running if usable else None,
            engine_waiting=usable.waiting if usable else None,
            capacity_tokens=self._rates.capacity_tokens,
            live_tokens=view.live_tokens,
            growth_tokens=growth,
            live_contexts_newest_first=view.live_contexts_newest_first,
            candidate_contexts=view.candidate_contexts,
            draining=view.draining,
            stale=usable is None,
            interval_s=interval.span or None,
            busy=interval.busy,
            completed=interval.completed,
            latency_s=interval.latency_s,
            tool_s=interval.tool_s,
            served_tokens=interval.served_tokens,
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
            reason=decision.reason,
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
