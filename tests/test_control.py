"""The controller: policy decisions reach the gate; failure modes on a stale signal."""

from __future__ import annotations

import pytest

from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate
from concur.control import Controller, TickRecord
from concur.policies import AIMD, AIMDParams, build_policy


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
    assert make("aimd")[1].window == AIMDParams().initial_window


def test_high_kv_usage_shrinks_the_window_and_stops_admissions() -> None:
    ctl, gate, clock = make("aimd")
    for i in range(8):
        gate.submit(f"a{i}")
    assert gate.live == 8
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
    ctl, gate, _ = make("aimd", mode)
    for i in range(3):
        gate.submit(f"a{i}")
    rec = ctl.tick(1.0, sig(0.0, 0.99), stale=True)
    assert rec.stale and rec.decision.reason == f"stale:{mode}"
    assert gate.window == expected
    admitted = gate.submit("late").granted
    assert admitted is (mode != "closed")


def test_recovery_after_stale_uses_the_policy_again() -> None:
    ctl, gate, _ = make("aimd", "closed")
    ctl.tick(1.0, None)
    assert gate.window == 0
    rec = ctl.tick(2.0, sig(2.0, 0.95))
    assert not rec.stale and rec.decision.reason.startswith("decrease")
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
