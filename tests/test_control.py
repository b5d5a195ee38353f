"""The controller: policy decisions reach the gate; failure modes on a stale signal; the
control loop's log of what it decided."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from concur import logs
from concur._control_loop import ControlLoop
from concur.adapters import get_adapter
from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate
from concur.control import Controller, TickRecord
from concur.metrics import ConcurMetrics
from concur.policies import AIMD, AIMDParams, PolicySettings, build_policy
from concur.poller import Poller


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def sig(
    t: float,
    kv: float,
    hits: float = 0,
    queries: float = 0,
    preempt: float = 0,
    cap: int | None = 100_000,
) -> EngineSignal:
    return EngineSignal(
        timestamp=t,
        kv_usage=kv,
        running=1,
        waiting=0,
        preemptions_total=preempt,
        prefix_hits_total=hits,
        prefix_queries_total=queries,
        kv_capacity_tokens=cap,
        engines=1,
    )


def make(policy_spec: str = "aimd", mode: str = "hold") -> tuple[Controller, AdmissionGate, Clock]:
    clock = Clock()
    gate = AdmissionGate(clock=clock)
    ctl = Controller(build_policy(policy_spec), gate, failure_mode=mode)  # type: ignore[arg-type]
    return ctl, gate, clock


def test_initial_window_comes_from_the_policy() -> None:
    assert make("static:5")[1].window == 5
    assert make("unlimited")[1].window is None
    # The default starts open (no evidence yet that the engine is the bottleneck); the
    # cache law starts at its initial window.
    assert make("aimd")[1].window is None
    assert make("aimd:cache")[1].window == AIMDParams().initial_window


def test_high_kv_usage_shrinks_the_window_and_stops_admissions() -> None:
    ctl, gate, clock = make("aimd:cache")
    for i in range(8):
        gate.submit(f"a{i}")
    assert gate.live == 8
    # One reading over high might be the gauge's peak as steps end: nothing changes yet.
    rec = ctl.tick(0.5, sig(0.5, kv=0.95))
    assert (rec.decision.reason, gate.window, gate.paused) == ("confirm", 8, 0)
    clock.now = 1.0
    rec = ctl.tick(1.0, sig(1.0, kv=0.95))
    assert rec.decision.window == 4 and gate.window == 4
    assert rec.decision.pressure == pytest.approx(0.95)
    # Pausing: the 4 newest are paused at their next step; the others carry on.
    assert gate.live == 4 and gate.paused == 4
    assert gate.submit("a0").granted
    assert not gate.submit("newcomer").granted


def test_rates_hit_rate_and_preemptions_per_interval() -> None:
    records: list[TickRecord] = []
    clock = Clock()
    gate = AdmissionGate(clock=clock)
    ctl = Controller(AIMD(AIMDParams(pressure=("kv",))), gate, on_tick=records.append)
    ctl.tick(0.0, sig(0.0, 0.1, hits=100, queries=200, preempt=2))
    ctl.tick(1.0, sig(1.0, 0.1, hits=190, queries=300, preempt=5))
    obs = records[-1].observation
    assert obs.hit_rate == pytest.approx(0.9)
    assert obs.new_preemptions == 3
    # The same reading seen twice (poller slower than the tick) counts no new preemptions.
    ctl.tick(2.0, sig(1.0, 0.1, hits=190, queries=300, preempt=5))
    assert records[-1].observation.new_preemptions == 0


@pytest.mark.parametrize(
    "mode, expected",
    [("hold", 8), ("closed", 3), ("open", None)],
)
def test_failure_modes_on_a_stale_signal(mode: str, expected: int | None) -> None:
    ctl, gate, _ = make("aimd:cache", mode)
    for i in range(3):
        gate.submit(f"a{i}")
    rec = ctl.tick(1.0, sig(0.0, 0.99), stale=True)
    assert rec.stale and rec.decision.reason == f"stale:{mode}"
    assert gate.window == expected
    admitted = gate.submit("late").granted
    assert admitted is (mode != "closed")


def test_closed_admits_no_new_agent_even_when_an_admitted_one_ends() -> None:
    ctl, gate, _ = make("aimd:cache", "closed")
    tickets = [gate.submit(f"a{i}") for i in range(3)]
    ctl.tick(1.0, None)
    late = gate.submit("late")
    assert not late.granted and gate.queued == 1
    gate.finish(tickets[0])
    assert gate.end("a0")  # a slot frees between ticks: still no new agent
    assert not late.granted and gate.queued == 1 and gate.live == 2
    ctl.tick(2.0, None)
    assert not late.granted
    ctl.tick(3.0, sig(3.0, 0.1))  # a fresh signal: the policy decides again
    assert late.granted


def test_no_cut_while_paused_agents_steps_drain() -> None:
    ctl, gate, _ = make("aimd:cache")
    tickets = [gate.submit(f"a{i}") for i in range(8)]
    assert all(t.granted for t in tickets)
    ctl.tick(0.0, sig(0.0, 0.95))
    rec = ctl.tick(1.0, sig(1.0, 0.95))
    assert (rec.decision.reason, gate.window, gate.paused) == ("decrease:pressure", 4, 4)
    # Past the cooldown the engine's usage is still high, but the paused agents' steps
    # are still running in it: their cache frees as they end, so no further cut.
    rec = ctl.tick(6.0, sig(6.0, 0.95))
    assert rec.observation.draining == 4
    assert (rec.decision.reason, gate.window) == ("draining", 4)
    for t in tickets[4:]:
        gate.finish(t)
    # They ended and the usage stays high: the live agents' own, cut once it lasts.
    rec = ctl.tick(7.0, sig(7.0, 0.95))
    assert (rec.decision.reason, gate.window) == ("confirm", 4)
    rec = ctl.tick(8.0, sig(8.0, 0.95))
    assert (rec.observation.draining, rec.decision.reason, gate.window) == (
        0,
        "decrease:pressure",
        2,
    )


def test_recovery_after_stale_uses_the_policy_again() -> None:
    ctl, gate, _ = make("aimd:cache", "closed")
    ctl.tick(1.0, None)
    assert gate.window == 0
    rec = ctl.tick(2.0, sig(2.0, 0.95))
    assert not rec.stale and rec.decision.reason == "confirm"
    assert gate.window == 8  # the policy's window again
    rec = ctl.tick(3.0, sig(3.0, 0.95))
    assert rec.decision.reason.startswith("decrease")
    assert gate.window == 4


def test_capacity_is_remembered_while_stale() -> None:
    ctl, _gate, _ = make("aimd")
    ctl.tick(0.0, sig(0.0, 0.1, cap=50_000))
    obs = ctl.observe(1.0, None, stale=True)
    assert obs.capacity_tokens == 50_000 and obs.kv_usage is None


def test_set_policy_swaps_live() -> None:
    ctl, gate, _ = make("aimd")
    ctl.set_policy(build_policy("static:3"))
    assert gate.window == 3
    ctl.tick(1.0, sig(1.0, 0.99))
    assert gate.window == 3


def test_a_live_retune_of_aimd_keeps_the_window_it_learned() -> None:
    ctl, gate, _ = make("aimd:cache")
    for i in range(40):
        gate.submit(f"a{i}")
    gate.apply(40)
    ctl.policy.window = 40  # type: ignore[attr-defined]  # what the policy had grown to
    ctl.set_policy(build_policy("aimd:cache", PolicySettings(aimd={"high": 0.9})))
    assert gate.window == 40 and ctl.policy.window == 40  # type: ignore[attr-defined]
    ctl.tick(0.5, sig(0.5, 0.95))
    ctl.tick(1.0, sig(1.0, 0.95))  # and it goes on from there: 40 x 0.5
    assert gate.window == 20
    # After no limit, it starts from the agents running, within its bounds.
    ctl.set_policy(build_policy("unlimited"))
    ctl.tick(2.0, sig(2.0, 0.95))
    assert gate.window is None and gate.live == 40  # the paused ones resumed
    ctl.set_policy(build_policy("aimd:cache", PolicySettings(aimd={"max_window": 32})))
    assert gate.window == 32
    ctl.set_policy(build_policy("aimd"))  # the default, from a window: resident, as it was
    assert gate.window == 32
    # The default after no limit stays open: the evidence to close comes as at its start.
    ctl.set_policy(build_policy("unlimited"))
    ctl.set_policy(build_policy("aimd"))
    assert gate.window is None


def test_the_observation_carries_the_intervals_pace() -> None:
    clock = Clock()
    gate = AdmissionGate(clock=clock)
    ctl = Controller(build_policy("unlimited"), gate)
    first = ctl.observe(0.0, None, stale=True)
    assert (first.interval_s, first.busy, first.completed) == (None, None, 0)
    t = gate.submit("a")
    clock.now = 0.5
    gate.finish(t)
    clock.now = 2.0
    second = ctl.observe(2.0, None, stale=True)
    assert second.interval_s == 2.0
    assert second.busy == pytest.approx(0.25)  # 0.5 s of work in 2 s
    assert (second.completed, second.latency_s, second.tool_s) == (1, 0.5, None)
    gate.submit("a")  # back after a 1.5 s tool call
    clock.now = 4.0
    third = ctl.observe(4.0, None, stale=True)
    assert third.tool_s == 1.5 and third.busy == pytest.approx(1.0)
    assert (third.completed, third.latency_s) == (0, None)


# ------------------------------------------------------------ the control loop's log


def loop(policy: str = "aimd:cache") -> tuple[ControlLoop, AdmissionGate]:
    clock = Clock()
    gate = AdmissionGate(clock=clock)
    controller = Controller(build_policy(policy), gate)
    poller = Poller("http://engine.invalid", get_adapter("vllm"), clock=clock)
    control = ControlLoop(controller, poller, ConcurMetrics(), clock=clock, interval=1.0)
    controller.on_tick = control.on_tick
    return control, gate


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for r in caplog.records:
        if r.name == "concur.app" and r.getMessage() in ("window", "held"):
            out.append((r.getMessage(), dict(getattr(r, logs.FIELDS_ATTR))))
    return out


def test_a_held_cut_is_logged_once_as_it_begins_and_a_cut_as_a_window_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="concur.app")
    control, gate = loop()
    for i in range(8):
        gate.submit(f"a{i}")
    ctl = control.controller
    ctl.tick(0.0, sig(0.0, kv=0.8))  # between low and high: hold, nothing to say
    ctl.tick(1.0, sig(1.0, kv=0.95))  # one reading over high: held, to confirm
    ctl.tick(2.0, sig(2.0, kv=0.95))  # it lasted: the cut
    ctl.tick(3.0, sig(3.0, kv=0.95))  # the paused agents' steps drain: held
    ctl.tick(4.0, sig(4.0, kv=0.95))  # still draining: no second line
    got = [(name, f["reason"], f["before"], f["after"]) for name, f in lines(caplog)]
    assert got == [
        ("held", "confirm", 8, 8),
        ("window", "decrease:pressure", 8, 4),
        ("held", "draining", 4, 4),
    ]
    assert lines(caplog)[0][1]["kv_usage"] == pytest.approx(0.95)


def test_an_open_law_logs_nothing_while_it_stays_open(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="concur.app")
    control, gate = loop("aimd")
    gate.submit("a0")
    for t in range(4):
        control.controller.tick(float(t), sig(float(t), kv=0.5))
    assert lines(caplog) == []
