"""Gone agents noticed in seconds, and waiting that says why (issue 18, points 1 and 2),
on the gate alone with a fake clock: the adaptive idle timeout, the grace after a
client hangs up, the reasons a waiting agent is given, and the defaults that make them
apply to a plain deployment."""

from __future__ import annotations

import math

from concur._idle import IdleRule
from concur.admission import AdmissionGate, AgentState, QueueFull, Ticket
from concur.config import Settings, load_settings

RULE = IdleRule(longest=300.0, shortest=15.0, factor=4.0, first=30.0, disconnect_grace=5.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def gate_with(window: int | None = 1, rule: IdleRule = RULE) -> tuple[AdmissionGate, Clock]:
    clock = Clock()
    return AdmissionGate(clock=clock, window=window, idle=rule), clock


def step(gate: AdmissionGate, clock: Clock, agent: str, took: float = 1.0) -> Ticket:
    """One request of ``agent`` that runs ``took`` seconds and finishes."""
    ticket = gate.submit(agent)
    assert ticket.granted
    clock.now += took
    gate.finish(ticket)
    return ticket


def reaped_at(gate: AdmissionGate, clock: Clock, agent: str, limit: float = 1000.0) -> float:
    """Tick the reaper every 0.5 s; the idle time at which ``agent`` was ended."""
    row = gate.get(agent)
    assert row is not None
    start = clock.now
    while gate.get(agent) is not None:
        assert clock.now - start < limit, "never reaped"
        clock.now += 0.5
        gate.reap()
    return round(clock.now - start, 6)


# ------------------------------------------------------------ idle timeout


def test_idle_timeout_adapts_to_the_agents_own_pauses() -> None:
    gate, clock = gate_with(window=None)
    step(gate, clock, "a")
    clock.now += 10.0  # a 10 s tool call
    step(gate, clock, "a")
    agent = gate.get("a")
    assert agent is not None and agent.longest_pause == 10.0
    assert gate.idle_limit(agent) == 40.0  # 4 x its longest pause, within [15, 300]
    # Gone (killed harness): noticed at 4 x its pauses, not at idle_timeout (300 s).
    assert reaped_at(gate, clock, "a") == 40.0


def test_a_long_tool_call_within_the_observed_range_is_not_ended() -> None:
    gate, clock = gate_with(window=None)
    step(gate, clock, "a")
    clock.now += 60.0  # it once paused a minute (a long build)
    step(gate, clock, "a")
    for pause in (5.0, 150.0, 239.0, 2.0):  # shorter and longer, all within 4 x 60 s
        for _ in range(int(pause / 0.5)):
            clock.now += 0.5
            assert gate.reap() == []
        step(gate, clock, "a")
    agent = gate.get("a")
    assert agent is not None and agent.state is AgentState.LIVE and agent.requests == 6
    assert agent.longest_pause == 239.0
    assert gate.idle_limit(agent) == 300.0  # capped by idle_timeout


def test_short_pauses_still_get_the_minimum() -> None:
    gate, clock = gate_with(window=None)
    step(gate, clock, "a")
    clock.now += 0.1
    step(gate, clock, "a")
    assert reaped_at(gate, clock, "a") == 15.0


def test_a_one_off_request_holds_its_slot_briefly() -> None:
    gate, clock = gate_with(window=1)
    step(gate, clock, "one-off")  # e.g. a request with X-Session-Id, never followed
    waiting = gate.submit("next")
    assert not waiting.granted
    assert reaped_at(gate, clock, "one-off") == 30.0  # idle_timeout_new, not 300 s
    assert waiting.granted


def test_factor_zero_is_the_old_fixed_timeout() -> None:
    fixed = IdleRule(longest=300.0)
    gate, clock = gate_with(window=None, rule=fixed)
    step(gate, clock, "a")
    clock.now += 1.0
    step(gate, clock, "a")
    assert reaped_at(gate, clock, "a") == 300.0
    legacy = AdmissionGate(clock=clock, idle_timeout=7.0)
    assert legacy.idle == IdleRule(7.0) and legacy.idle_timeout == 7.0


# ------------------------------------------------------ the client hung up


def test_a_client_that_hangs_up_mid_request_frees_the_slot_after_the_grace() -> None:
    gate, clock = gate_with(window=1)
    step(gate, clock, "a")
    clock.now += 50.0
    step(gate, clock, "a")  # it pauses 50 s: its idle timeout is 200 s
    ticket = gate.submit("a")
    clock.now += 1.0
    ticket.client_gone = True  # killed while its response streamed
    gate.finish(ticket)
    queued = gate.submit("b")
    assert not queued.granted
    assert reaped_at(gate, clock, "a") == 5.0  # disconnect_grace, not 200 s
    assert queued.granted


def test_a_new_request_within_the_grace_keeps_the_agent() -> None:
    gate, clock = gate_with(window=1)
    ticket = gate.submit("a")
    ticket.client_gone = True  # it cancelled a stream on purpose...
    gate.finish(ticket)
    clock.now += 2.0
    step(gate, clock, "a")  # ...and went on within the grace
    for _ in range(20):
        clock.now += 0.5
        assert gate.reap() == []
    agent = gate.get("a")
    assert agent is not None and agent.gone_at is None


def test_a_hang_up_while_paused_or_held_starts_the_grace() -> None:
    gate, clock = gate_with(window=2)
    step(gate, clock, "a")
    step(gate, clock, "b")
    gate.apply(1, pause=True)  # b (newest) pauses at its step boundary
    pending = gate.submit("b")
    assert not pending.granted
    gate.abandon(pending)  # its client hangs up while it waits
    assert reaped_at(gate, clock, "b") == 5.0
    gate.apply(2, hold_requests=True)
    held = gate.submit("a")
    assert held.held
    gate.abandon(held)
    assert reaped_at(gate, clock, "a") == 5.0


def test_a_queued_client_that_hangs_up_leaves_no_trace() -> None:
    gate, clock = gate_with(window=1)
    step(gate, clock, "a")
    queued = gate.submit("b")
    gate.abandon(queued)
    assert gate.get("b") is None and gate.queued == 0


# -------------------------------------------------------- why they wait


def test_a_timed_out_agent_is_told_the_window_is_full() -> None:
    gate, clock = gate_with(window=1)
    gate.retry_after = 5.0
    step(gate, clock, "a")
    queued = gate.submit("b")
    agent = gate.get("b")
    assert agent is not None
    why = gate.waiting_for(agent)
    assert why is not None and why.code == "window_full"
    assert "1 of 1 slots live" in why.detail
    clock.now += 60.0
    err = gate.timed_out(queued)
    assert "waited 60.0s for an agent slot" in str(err)
    assert "the window is full (1 of 1 slots live)" in str(err)
    assert err.retry_after == 5.0


def test_reasons_follow_the_decision() -> None:
    gate, clock = gate_with(window=1)
    step(gate, clock, "a")
    gate.submit("b")
    reason = gate.queue_reason()
    assert reason is not None and reason.code == "window_full"
    gate.apply(1, reason="stale:hold")
    reason = gate.queue_reason()
    assert reason is not None and reason.code == "engine_stale"
    assert "control.failure_mode is hold" in reason.detail
    gate.apply(1, admit_new=False, reason="stale:closed")
    reason = gate.queue_reason()
    assert reason is not None and reason.code == "engine_stale"
    assert "no new agent is admitted" in reason.detail
    gate.apply(2, admit_new=False, reason="closed")
    reason = gate.queue_reason()
    assert reason is not None and reason.code == "admission_paused"
    gate.apply(2, pause=True)  # b admitted
    gate.apply(1, pause=True, reason="decrease")  # b, the newest, paused
    b = gate.get("b")
    assert b is not None and b.state is AgentState.PAUSED
    why = gate.waiting_for(b)
    assert why is not None and why.code == "paused" and "decrease" in why.detail
    gate.submit("c")
    reason = gate.queue_reason()
    assert reason is not None and reason.code == "resuming_first"


def test_a_full_queue_says_why() -> None:
    clock = Clock()
    gate = AdmissionGate(clock=clock, window=1, max_queue_len=0, retry_after=3.0)
    gate.submit("a")
    try:
        gate.submit("b")
    except QueueFull as exc:
        assert "the window is full" in str(exc) and exc.retry_after == 3.0
    else:
        raise AssertionError("no QueueFull")


# ------------------------------------------------------------- defaults


def test_defaults_answer_an_openai_sdk_client_well_within_its_timeout() -> None:
    """The openai SDK waits up to 600 s for a response and retries a 429 twice, after
    Retry-After (when <= 60 s). With concur's defaults a client that cannot get a slot
    sees the 429 (which says why) after at most three waits and two pauses: well under
    one SDK timeout, where it used to be three (about 30 minutes)."""
    adm = Settings().admission
    sdk_timeout, sdk_retries = 600.0, 2
    assert adm.retry_after <= 60
    worst = (sdk_retries + 1) * adm.max_queue_wait + sdk_retries * adm.retry_after
    assert worst <= sdk_timeout / 2
    assert math.isclose(adm.max_queue_wait, 60.0)


def test_defaults_keep_ordinary_traffic_out_of_the_slots() -> None:
    adm = Settings().admission
    assert adm.anonymous == "bypass"  # a plain curl is never held
    assert "body:user" not in adm.identity  # OpenAI's user names a person, not a session
    assert "header:X-Session-Id" in adm.identity
    idle = load_settings(env={}).gate_options()["idle"]
    assert isinstance(idle, IdleRule)
    assert idle.timeout(None) <= 60  # a one-off session request: well under a minute
    assert idle.disconnect_grace is not None and idle.disconnect_grace <= 10


def test_idle_settings_are_bounded_by_idle_timeout() -> None:
    s = load_settings(env={}, overrides={"admission.idle_timeout": 10.0})
    idle = s.gate_options()["idle"]
    assert (idle.timeout(None), idle.timeout(0.1), idle.timeout(100.0)) == (10.0, 10.0, 10.0)
