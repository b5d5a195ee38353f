"""The event kernel: ordering, cancellation, run limits, determinism."""

from __future__ import annotations

import itertools
import random
from functools import partial

import pytest

from concur.sim.kernel import EventKernel, Priority


def test_events_run_by_time_then_priority_then_schedule_order() -> None:
    k = EventKernel()
    log: list[str] = []
    k.schedule(2.0, Priority.DEFAULT, lambda: log.append("t2"))
    k.schedule(1.0, Priority.CONTROL_TICK, lambda: log.append("tick"))
    k.schedule(1.0, Priority.ENGINE_STEP_DONE, lambda: log.append("step-done"))
    k.schedule(1.0, Priority.AGENT_ARRIVAL, lambda: log.append("arrive-a"))
    k.schedule(1.0, Priority.AGENT_ARRIVAL, lambda: log.append("arrive-b"))
    k.schedule(1.0, Priority.TOOL_DONE, lambda: log.append("tool"))
    k.schedule(1.0, Priority.ENGINE_STEP_START, lambda: log.append("step-start"))
    result = k.run()
    assert log == [
        "step-done",
        "tool",
        "arrive-a",
        "arrive-b",
        "tick",
        "step-start",
        "t2",
    ]
    assert result.events_processed == 7
    assert result.reason == "empty"
    assert result.stopped_by_until is False
    assert result.end_time == 2.0
    assert k.now == 2.0


def test_priority_order_is_documented_order() -> None:
    assert (
        Priority.ENGINE_STEP_DONE
        < Priority.TOOL_DONE
        < Priority.AGENT_ARRIVAL
        < Priority.CONTROL_TICK
        < Priority.ENGINE_STEP_START
        < Priority.DEFAULT
    )


def test_callbacks_see_their_own_time_and_can_schedule_more() -> None:
    k = EventKernel(start=10.0)
    seen: list[tuple[str, float]] = []

    def first() -> None:
        seen.append(("first", k.now))
        k.schedule_in(0.5, Priority.DEFAULT, lambda: seen.append(("later", k.now)))
        # Same instant, same priority: runs after everything already queued.
        k.schedule(k.now, Priority.DEFAULT, lambda: seen.append(("same-instant", k.now)))

    k.schedule(11.0, Priority.DEFAULT, first)
    k.schedule(11.0, Priority.DEFAULT, lambda: seen.append(("second", k.now)))
    k.run()
    assert seen == [
        ("first", 11.0),
        ("second", 11.0),
        ("same-instant", 11.0),
        ("later", 11.5),
    ]


def test_cancelled_events_do_not_run() -> None:
    k = EventKernel()
    log: list[int] = []
    h1 = k.schedule(1.0, Priority.DEFAULT, lambda: log.append(1))
    h2 = k.schedule(2.0, Priority.DEFAULT, lambda: log.append(2))
    assert k.pending == 2
    assert h1.cancel() is True
    assert h1.cancel() is False
    assert h1.cancelled and not h1.pending
    assert k.pending == 1
    assert k.peek() == 2.0
    result = k.run()
    assert log == [2]
    assert result.events_processed == 1
    assert h2.done and not h2.pending
    assert k.cancel(h2) is False  # already ran


def test_run_until_stops_before_later_events_and_resumes() -> None:
    k = EventKernel()
    log: list[float] = []
    for t in (1.0, 2.0, 3.0, 4.0):
        k.schedule(t, Priority.DEFAULT, partial(log.append, t))
    r1 = k.run(until=2.0)
    assert log == [1.0, 2.0]  # events at exactly `until` run
    assert r1.stopped_by_until is True
    assert r1.reason == "until"
    assert r1.events_processed == 2
    assert k.now == 2.0
    r2 = k.run(until=2.5)
    assert r2.events_processed == 0
    assert r2.end_time == 2.5
    r3 = k.run()
    assert log == [1.0, 2.0, 3.0, 4.0]
    assert r3.events_processed == 2
    assert r3.end_time == 4.0


def test_run_until_past_the_last_event_moves_the_clock_to_until() -> None:
    k = EventKernel()
    k.schedule(1.0, Priority.DEFAULT, lambda: None)
    r = k.run(until=5.0)
    assert r.reason == "empty"
    assert r.stopped_by_until is False
    assert r.end_time == 5.0
    assert k.now == 5.0


def test_max_events_and_stop() -> None:
    k = EventKernel()
    log: list[int] = []
    for i in range(5):
        k.schedule(float(i), Priority.DEFAULT, partial(log.append, i))
    r = k.run(max_events=2)
    assert (r.reason, r.events_processed, log) == ("max_events", 2, [0, 1])

    def stopper() -> None:
        log.append(99)
        k.stop()

    k.schedule(2.0, Priority.ENGINE_STEP_DONE, stopper)
    r = k.run()
    assert r.reason == "stopped"
    assert log == [0, 1, 99]
    assert k.now == 2.0
    r = k.run()
    assert log == [0, 1, 99, 2, 3, 4]
    assert k.events_total == 6


def test_rejects_bad_times() -> None:
    k = EventKernel(start=5.0)
    with pytest.raises(ValueError, match="past"):
        k.schedule(4.0, Priority.DEFAULT, lambda: None)
    with pytest.raises(ValueError, match="delay"):
        k.schedule_in(-1.0, Priority.DEFAULT, lambda: None)
    with pytest.raises(ValueError, match="finite"):
        k.schedule(float("nan"), Priority.DEFAULT, lambda: None)
    with pytest.raises(ValueError, match="delay"):
        k.schedule_in(float("nan"), Priority.DEFAULT, lambda: None)
    with pytest.raises(ValueError, match="before now"):
        k.run(until=1.0)
    with pytest.raises(ValueError, match="callback"):
        k.schedule(6.0, Priority.DEFAULT)


def _random_trace(seed: int) -> list[tuple[float, str]]:
    k = EventKernel(random.Random(seed))
    trace: list[tuple[float, str]] = []

    def agent(name: str, steps: int) -> None:
        trace.append((k.now, name))
        if steps:
            k.schedule_in(
                round(k.rng.expovariate(1.0), 3),
                Priority.TOOL_DONE,
                lambda: agent(name, steps - 1),
            )

    for i in range(20):
        at = round(k.rng.uniform(0, 5), 1)
        k.schedule(at, Priority.AGENT_ARRIVAL, partial(agent, f"a{i}", 5))
    k.run()
    return trace


def test_same_seed_same_trace_and_kernels_share_no_state() -> None:
    a = _random_trace(7)
    b = _random_trace(7)
    c = _random_trace(8)
    assert a == b
    assert a != c
    assert len(a) == 20 * 6
    # Time never goes backwards.
    assert all(t1 <= t2 for (t1, _), (t2, _) in itertools.pairwise(a))


def test_kernel_keeps_the_rng_it_is_given() -> None:
    rng = random.Random(3)
    assert EventKernel(rng).rng is rng
    assert EventKernel().rng.random() == random.Random(0).random()
