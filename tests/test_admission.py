"""The admission gate: FIFO, timeouts, pausing, reaping, release rate, exact accounting."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concur import Permit
from concur._features import GrowthFeatures
from concur.admission import (
    AdmissionGate,
    AgentEnded,
    AgentState,
    GateClosed,
    GateEvent,
    QueueFull,
    QueueTimeout,
    Ticket,
    TicketStatus,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_gate(window: int | None = 2, **kw: object) -> tuple[AdmissionGate, FakeClock]:
    clock = FakeClock()
    return AdmissionGate(clock=clock, window=window, **kw), clock  # type: ignore[arg-type]


def run(gate: AdmissionGate, agent: str, **kw: object) -> Ticket:
    """Submit a request and return its ticket (granted or waiting)."""
    return gate.submit(agent, **kw)  # type: ignore[arg-type]


def states(gate: AdmissionGate) -> dict[str, str]:
    return {a.agent_id: a.state.value for a in gate.agents()}


def test_fifo_admission_and_replacement_on_end() -> None:
    gate, _ = make_gate(2)
    ta, tb = run(gate, "a"), run(gate, "b")
    assert ta.granted and tb.granted
    order: list[str] = []
    waiting = [gate.submit(x, on_resolve=lambda t: order.append(t.agent_id)) for x in "cde"]
    assert not any(t.granted for t in waiting)
    assert (gate.live, gate.queued) == (2, 3)
    gate.finish(ta)
    assert gate.end("a")
    gate.finish(tb)
    gate.end("b")
    assert order == ["c", "d"]
    assert (gate.live, gate.queued) == (2, 1)


def test_admitted_agent_passes_straight_through() -> None:
    gate, _ = make_gate(1)
    t1 = run(gate, "a")
    gate.finish(t1)
    queued = run(gate, "b")
    t2 = run(gate, "a")  # the admitted agent's next step is not queued behind b
    assert t2.granted and not queued.granted


def test_done_flag_frees_the_slot_when_the_response_completes() -> None:
    gate, _ = make_gate(1)
    t = run(gate, "a", done=True)
    waiting = run(gate, "b")
    assert not waiting.granted
    gate.finish(t)
    assert waiting.granted
    assert states(gate) == {"b": "live"}


def test_full_queue_raises_at_once() -> None:
    gate, _ = make_gate(1, max_queue_len=2)
    run(gate, "a")
    run(gate, "b")
    run(gate, "c")
    events: list[GateEvent] = []
    gate.on_event = events.append
    with pytest.raises(QueueFull) as err:
        run(gate, "d")
    assert err.value.retry_after is not None
    assert [e.kind for e in events] == ["full"]
    assert gate.queued == 2


def test_idle_reaping_with_a_fake_clock() -> None:
    gate, clock = make_gate(2, idle_timeout=30.0)
    ta = run(gate, "a")
    gate.finish(ta)
    tb = run(gate, "b")  # stays in flight: never reaped
    clock.now = 29.0
    assert gate.reap() == []
    clock.now = 31.0
    assert gate.reap() == ["a"]
    assert states(gate) == {"b": "live"}
    gate.finish(tb)
    clock.now = 100.0
    assert gate.reap() == ["b"]
    assert gate.active == 0


def test_pausing_picks_newest_and_never_touches_in_flight() -> None:
    gate, _ = make_gate(4)
    tickets = {x: run(gate, x) for x in "abcd"}
    for x in "ab":
        gate.finish(tickets[x])
    # c and d are in flight. Shrink to 2 with pausing: the newest two (d, c) pause.
    gate.apply(2, pause=True)
    assert states(gate) == {"a": "live", "b": "live", "c": "paused", "d": "paused"}
    # In-flight requests are untouched: still granted, and finishing them is fine.
    assert tickets["c"].granted and tickets["d"].granted
    gate.finish(tickets["d"])
    # d's next step is held at the step boundary.
    held = run(gate, "d")
    assert held.status is TicketStatus.WAITING
    # a's next step is not.
    assert run(gate, "a").granted


def test_without_pause_shrinking_only_stops_admissions() -> None:
    gate, _ = make_gate(3)
    for x in "abc":
        gate.finish(run(gate, x))
    gate.apply(1, pause=False)
    assert states(gate) == {"a": "live", "b": "live", "c": "live"}
    assert run(gate, "c").granted
    assert not run(gate, "new").granted


def test_paused_agents_resume_before_new_ones() -> None:
    gate, _ = make_gate(2)
    for x in "ab":
        gate.finish(run(gate, x))
    newcomer = run(gate, "n")
    gate.apply(1, pause=True)  # b paused
    held_b = run(gate, "b")
    assert not held_b.granted
    gate.apply(2)  # room for one: b resumes first, n keeps waiting
    assert held_b.granted and not newcomer.granted
    assert states(gate) == {"a": "live", "b": "live", "n": "queued"}


def test_release_rate_is_limited_per_tick() -> None:
    gate, _ = make_gate(1)
    gate.finish(run(gate, "a"))
    waiting = [run(gate, f"q{i}") for i in range(6)]
    gate.apply(10, release_limit=2)
    assert sum(t.granted for t in waiting) == 2
    gate.apply(10, release_limit=2)
    assert sum(t.granted for t in waiting) == 4
    gate.apply(10, release_limit=None)
    assert all(t.granted for t in waiting)


def test_priority_classes_go_first_then_fifo() -> None:
    gate, _ = make_gate(1)
    run(gate, "a")
    low1 = run(gate, "l1")
    high = run(gate, "h", priority=5)
    gate.end("a")
    assert high.granted and not low1.granted


def test_abandon_while_queued_leaves_no_trace() -> None:
    gate, _ = make_gate(1)
    run(gate, "a")
    t = run(gate, "b")
    gate.abandon(t)
    assert gate.queued == 0 and gate.get("b") is None
    assert t.status is TicketStatus.CANCELLED


def test_abandon_while_paused_keeps_the_agent() -> None:
    gate, _ = make_gate(2)
    for x in "ab":
        gate.finish(run(gate, x))
    gate.apply(1, pause=True)
    t = run(gate, "b")
    gate.abandon(t)
    agent = gate.get("b")
    assert agent is not None and agent.state is AgentState.PAUSED and not agent.pending
    gate.apply(2)
    assert states(gate) == {"a": "live", "b": "live"}


def test_end_rejects_pending_requests_and_close_rejects_everyone() -> None:
    gate, _ = make_gate(1)
    run(gate, "a")
    queued = run(gate, "b")
    assert gate.end("b")
    assert isinstance(queued.error, AgentEnded)
    other = run(gate, "c")
    gate.close()
    assert isinstance(other.error, GateClosed)
    with pytest.raises(GateClosed):
        run(gate, "d")
    assert gate.queued == 0


def test_request_level_holding_epp() -> None:
    gate, _ = make_gate(None)
    gate.apply(None, hold_requests=True)
    t1, t2 = run(gate, "a"), run(gate, "b")
    assert not t1.granted and gate.held == 2
    gate.apply(None, hold_requests=False)
    assert t1.granted and t2.granted and gate.held == 0


def test_usage_tracks_context_and_growth() -> None:
    gate, _ = make_gate(4)
    gate.observer = growth = GrowthFeatures()  # what the controller attaches
    t = run(gate, "a", context_tokens=1000)
    assert gate.view().live_tokens == 1000
    t.usage_tokens = 1300
    gate.finish(t)
    t = run(gate, "a", context_tokens=2000)
    t.usage_tokens = 2300
    gate.finish(t)
    view = gate.view()
    assert view.live_tokens == 2300
    # Growth is measured between consecutive responses: 2300 - 1300.
    assert growth.estimator.growth_per_step == pytest.approx(1000)


async def test_acquire_waits_then_times_out_with_429_info() -> None:
    gate = AdmissionGate(
        clock=lambda: asyncio.get_running_loop().time(), window=1, max_queue_wait=0.05
    )
    first = await Permit(gate, "a").acquire()
    with pytest.raises(QueueTimeout) as err:
        await Permit(gate, "b").acquire()
    assert err.value.retry_after is not None
    assert gate.queued == 0
    gate.finish(first)


async def test_acquire_is_admitted_when_a_slot_frees() -> None:
    gate = AdmissionGate(clock=lambda: 0.0, window=1)
    async with Permit(gate, "a", done=True):
        waiter = asyncio.create_task(Permit(gate, "b").acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
    ticket = await asyncio.wait_for(waiter, 1)
    assert ticket.granted and gate.live == 1
    gate.finish(ticket)
    gate.end("b")
    assert gate.active == 0


async def test_cancellation_while_queued_and_paused_leaves_no_trace() -> None:
    gate = AdmissionGate(clock=lambda: 0.0, window=2)
    async with Permit(gate, "a"):
        pass
    async with Permit(gate, "b"):
        pass
    task = asyncio.create_task(Permit(gate, "c").acquire())
    await asyncio.sleep(0)
    assert gate.queued == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.queued == 0 and gate.get("c") is None
    gate.apply(1, pause=True)
    task = asyncio.create_task(Permit(gate, "b").acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    agent = gate.get("b")
    assert agent is not None and not agent.pending and agent.in_flight == 0


@settings(max_examples=1000, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["req", "finish", "done", "cancel", "end", "apply", "tick"]),
            st.integers(0, 7),
            st.integers(0, 6),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_random_sequences_always_drain_to_zero(
    ops: list[tuple[str, int, int, bool]],
) -> None:
    clock = FakeClock()
    gate = AdmissionGate(
        clock=clock, window=2, max_queue_len=5, max_queue_wait=5.0, idle_timeout=20.0
    )
    tickets: list[Ticket] = []
    for op, agent_no, arg, flag in ops:
        agent = f"a{agent_no}"
        if op in ("req", "done"):
            with contextlib.suppress(QueueFull):
                tickets.append(gate.submit(agent, context_tokens=arg * 100, done=op == "done"))
        elif op == "finish" and tickets:
            t = tickets[arg % len(tickets)]
            t.usage_tokens = arg * 150
            gate.finish(t)
        elif op == "cancel" and tickets:
            gate.abandon(tickets[arg % len(tickets)])
        elif op == "end":
            gate.end(agent)
        elif op == "apply":
            gate.apply(
                arg or None,
                pause=flag,
                hold_requests=arg == 6 and flag,
                release_limit=1 if flag else None,
            )
        else:
            clock.now += arg
            gate.reap()
        assert gate.live >= 0 and gate.paused >= 0
        assert gate.live + gate.paused == sum(1 for a in gate.agents() if a.state != "queued")
    # Every client finishes or gives up; then the gate opens and all agents end.
    for t in tickets:
        if t.granted:
            gate.finish(t)
        else:
            gate.abandon(t)
    gate.apply(None)
    for a in list(gate.agents()):
        gate.end(a.agent_id)
    assert (gate.active, gate.queued, gate.held) == (0, 0, 0)
    assert all(a.in_flight >= 0 for a in gate.agents())


@pytest.mark.parametrize("how", ["finish", "abandon", "finish_done"])
def test_a_ticket_from_before_an_end_never_touches_the_agent_admitted_again(how: str) -> None:
    # DELETE /concur/agents/a while a's request runs; a comes back and is admitted anew.
    gate, clock = make_gate(1, idle_timeout=10.0)
    old = run(gate, "a", done=how == "finish_done")
    assert gate.end("a")
    new = run(gate, "a")
    assert new.granted
    again = gate.get("a")
    assert again is not None and again.in_flight == 1
    if how == "abandon":
        gate.abandon(old)
    else:
        gate.finish(old)
    assert (again.in_flight, again.requests, again.ending) == (1, 0, False)
    clock.now = 20.0
    assert gate.reap() == []  # its request is still running: not idle
    assert gate.live == 1 and not run(gate, "b").granted  # the slot stays taken
    gate.finish(new)
    assert again.in_flight == 0 and again.requests == 1


def test_a_held_ticket_from_before_an_end_is_rejected_not_counted() -> None:
    gate, _ = make_gate(1)
    gate.hold_requests = True
    first = run(gate, "a")
    assert first.held and not first.granted
    assert gate.end("a")
    assert first.status is TicketStatus.REJECTED and isinstance(first.error, AgentEnded)
    gate.hold_requests = False
    new = run(gate, "a")
    gate.abandon(first)  # a late cancel of the old, rejected ticket
    again = gate.get("a")
    assert new.granted and again is not None and again.in_flight == 1


def test_a_held_request_of_an_agent_paused_meanwhile_waits_for_its_resume() -> None:
    # epp held b's next step; then a pausing policy pauses b in the same apply.
    gate, _ = make_gate(None)
    first_a, first_b = run(gate, "a"), run(gate, "b")
    gate.finish(first_a)
    gate.finish(first_b)
    gate.apply(None, hold_requests=True)
    held = run(gate, "b")
    assert held.held and not held.granted
    gate.apply(1, pause=True)
    b = gate.get("b")
    assert b is not None and b.state is AgentState.PAUSED
    assert not held.granted and held in b.pending and b.in_flight == 0
    gate.apply(2)  # room again: b resumes, and its step goes
    assert held.granted and b.state is AgentState.LIVE and b.in_flight == 1
    gate.finish(held)
    assert b.in_flight == 0


def test_paused_agents_resume_in_the_order_view_lists_them() -> None:
    # With priorities, admission order differs from arrival order: B (priority 5)
    # arrived after A but was admitted first.
    gate, _ = make_gate(2)
    run(gate, "y", context_tokens=10)
    x = run(gate, "x", context_tokens=10)
    run(gate, "A", context_tokens=90_000)
    run(gate, "B", context_tokens=1_000, priority=5)
    gate.finish(x)
    gate.end("x")
    gate.apply(3)
    assert [a.agent_id for a in gate.agents()][:3] == ["y", "B", "A"]
    gate.apply(1, pause=True)
    assert gate.view().candidate_contexts == (1_000, 90_000)  # B first, then A
    gate.apply(2, release_limit=1)
    assert states(gate) == {"y": "live", "B": "live", "A": "paused"}


def test_a_paused_agents_last_step_given_up_ends_the_agent() -> None:
    gate, _ = make_gate(2, idle_timeout=600.0)
    for agent in ("a", "b"):
        gate.finish(run(gate, agent))
    gate.apply(1, pause=True)  # b is paused
    last = run(gate, "b", done=True)
    assert not last.granted
    waiting = run(gate, "c")  # a new agent queues behind the paused one
    gate.abandon(last)  # b's client gives up on its last step
    assert gate.get("b") is None  # over now, not at admission.idle_timeout
    gate.apply(2)
    assert waiting.granted and states(gate) == {"a": "live", "c": "live"}


def test_only_agents_that_ran_their_course_teach_the_growth_estimator() -> None:
    gate, clock = make_gate(None, idle_timeout=1.0)
    gate.observer = growth = GrowthFeatures()  # what the controller attaches
    for agent, steps in (("done", 9), ("idle", 7)):
        for i in range(steps):
            gate.finish(run(gate, agent, done=agent == "done" and i == steps - 1))
    gate.abandon(run(gate, "cancelled"))  # its first request given up: no course run
    gate.finish(run(gate, "admin"))
    assert gate.end("admin")
    assert gate.reap() == []
    clock.now = 2.0
    assert gate.reap() == ["idle"]
    assert growth.estimator.expected_steps == 8.0  # (9 + 7) / 2


@pytest.mark.parametrize("path", ["done_first", "done_last", "granted", "held"])
def test_a_given_up_last_step_ends_its_agent_on_every_path(path: str) -> None:
    gate, _ = make_gate(2)
    for agent in ("a", "b"):
        gate.finish(run(gate, agent))
    if path == "held":
        gate.apply(2, hold_requests=True)
        last = run(gate, "b", done=True)
        assert last.held
        gate.abandon(last)
    else:
        gate.apply(1, pause=True)  # b is paused; its next steps wait
        if path == "granted":
            last = run(gate, "b", done=True)
            gate.apply(2)  # resumed: the last step is granted...
            assert last.granted
            gate.abandon(last)  # ...and its caller gives up in the same instant
        else:
            other = run(gate, "b")
            last = run(gate, "b", done=True)
            for ticket in (last, other) if path == "done_first" else (other, last):
                gate.abandon(ticket)
    assert gate.get("b") is None and gate.live == 1


def test_pace_times_the_engine_busy_the_requests_and_the_tool_calls() -> None:
    gate, clock = make_gate(None)
    a = run(gate, "a")  # t=0: the engine has work
    clock.now = 1.0
    b = run(gate, "b")
    clock.now = 2.0
    gate.finish(a)  # 2 s for a
    clock.now = 3.0
    gate.finish(b)  # 2 s for b; busy from 0 to 3
    clock.now = 5.0
    pace = gate.pace()
    assert (pace.busy_s, pace.requests, pace.latency_s) == (3.0, 2, 4.0)
    assert (pace.tools, pace.tool_s) == (0, 0.0)
    a2 = run(gate, "a")  # back from a 3 s tool call (its response ended at t=2)
    clock.now = 6.0
    pace = gate.pace()
    assert (pace.tools, pace.tool_s) == (1, 3.0)
    assert pace.busy_s == 4.0  # the busy period in progress counts up to now
    gate.abandon(a2)  # given up: its time still counts, and the engine is idle again
    clock.now = 9.0
    assert gate.pace().busy_s == 4.0 and gate.pace().requests == 3
    assert gate.view().pace == gate.pace()


def test_pace_ignores_waiting_and_held_requests() -> None:
    gate, clock = make_gate(1)
    run(gate, "a")
    queued = run(gate, "b")  # waits for a slot: the engine does not have it
    assert not queued.granted
    clock.now = 10.0
    gate.abandon(queued)
    assert gate.pace().requests == 0 and gate.pace().busy_s == 10.0  # only a's time


def test_view_counts_paused_agents_whose_last_step_is_still_in_the_engine() -> None:
    gate, _ = make_gate(3)
    ta, tb, tc = (run(gate, agent, context_tokens=100) for agent in "abc")
    gate.finish(tb)
    gate.apply(1, pause=True)  # b and c paused; c's step is still in the engine
    assert states(gate) == {"a": "live", "b": "paused", "c": "paused"}
    assert gate.view().draining == 1
    gate.finish(tc)
    assert gate.view().draining == 0
    gate.finish(ta)
    assert gate.view().draining == 0  # a live agent's step is not draining
