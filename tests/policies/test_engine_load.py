"""Engine-aware AIMD: open up when the engine idles while the cache holds agents back."""

from __future__ import annotations

import dataclasses
import math

import pytest

from concur.policies import AIMD, AIMDParams, Observation, build_policy
from concur.policies.engine_load import TIE, EngineLoad, Ewma, Mode

CAP = 100_000


def load(**kw: float) -> EngineLoad:
    args = {"busy_low": 0.8, "share_high": 0.75, "dwell_cycles": 2.0, "min_dwell_s": 2.0}
    return EngineLoad(**{**args, **kw})  # type: ignore[arg-type]


def feed(
    el: EngineLoad,
    now: float,
    busy: float,
    completed: int = 2,
    cycle: float = 1.5,
    served: int = 0,
) -> None:
    """The 1-second interval ending at ``now``: ``completed`` requests of ``served`` context
    tokens in all, agents cycling every ``cycle`` s."""
    el.update(now, 1.0, busy, completed, latency_s=0.5, tool_s=cycle - 0.5, served_tokens=served)


def test_an_ewma_weighs_by_time() -> None:
    e = Ewma()
    assert e.add(0.2, 1.0, 5.0) == 0.2  # the first sample is taken as it is
    after = e.add(1.0, 5.0, 5.0)  # one time constant later: 63% of the way
    assert after == pytest.approx(0.2 + 0.8 * (1 - math.exp(-1)))
    assert e.add(0.0, 0.0, 5.0) == after  # no time passed: no change


def test_the_averages_run_over_an_agent_cycle() -> None:
    el = load()
    el.update(0.0, None, 0.5, 1, 0.5, 1.0)  # the first tick has no interval: nothing
    el.update(1.0, 1.0, None, 1, 0.5, 1.0)  # no busy share measured: nothing
    assert el.busy is not None and el.busy.value is None and not el.completions
    feed(el, 1.0, 0.5, completed=3, cycle=4.0)
    assert el.cycle is not None and el.cycle.value == 4.0
    assert el.dwell() == 8.0  # two cycles
    feed(el, 2.0, 1.0, cycle=4.0)
    # tau = one cycle (4 s): a 1 s interval moves the average 1 - e^(-1/4) of the way.
    assert el.busy.value == pytest.approx(0.5 + 0.5 * (1 - math.exp(-0.25)))
    short = load()
    feed(short, 1.0, 0.5, cycle=0.5)
    assert short.dwell() == 2.0  # never under min_dwell_s


def test_work_is_context_tokens_served_or_else_requests() -> None:
    el = load()
    for t in range(1, 5):
        feed(el, float(t), 0.5, completed=2, served=0)
    assert el.rate(1.0, 4.0) == pytest.approx(2.0)  # ticks 2, 3, 4: 6 requests in 3 s
    feed(el, 5.0, 0.5, completed=2, served=9_000)
    feed(el, 6.0, 0.5, completed=1, served=3_000)
    assert el.rate(4.0, 6.0) == pytest.approx(6_000.0)  # tokens, when known
    assert el.rate(6.0, 6.0) is None


def test_it_opens_after_the_engine_idled_for_the_dwell_while_agents_waited() -> None:
    el = load()
    for t in range(3):
        feed(el, float(t), 0.5)
        assert el.step(float(t), held_back=True, congested=True) is Mode.RESIDENT
    feed(el, 3.0, 0.5)
    assert el.step(3.0, held_back=True, congested=True) is Mode.OPEN  # 3 s >= 2 cycles
    assert el.resident_rate == pytest.approx(2.0)  # over the last dwell: what to beat


def test_a_busy_engine_or_an_uncongested_cache_with_nobody_waiting_keeps_it_resident() -> None:
    el = load()
    for t in range(10):
        feed(el, float(t), 0.95)
        assert el.step(float(t), held_back=True, congested=True) is Mode.RESIDENT
    el = load()
    for t in range(10):
        feed(el, float(t), 0.3)
        assert el.step(float(t), held_back=False, congested=False) is Mode.RESIDENT


def test_an_engine_idle_before_congestion_opens_at_it_pausing_nobody() -> None:
    el = load()
    for t in range(10):  # idle for 10 s, the cache not yet congested, nobody waiting
        feed(el, float(t), 0.3)
        assert el.step(float(t), held_back=False, congested=False) is Mode.RESIDENT
    feed(el, 10.0, 0.3)
    # The first congested tick opens at once: the idle dwell (3 s) was seen before it.
    assert el.step(10.0, held_back=False, congested=True) is Mode.OPEN
    # An engine that only now turns idle still needs its dwell.
    el = load()
    for t in range(10):
        feed(el, float(t), 0.95)
        el.step(float(t), held_back=False, congested=False)
    for t in range(10, 13):
        feed(el, float(t), 0.1)
        assert el.step(float(t), held_back=False, congested=True) is Mode.RESIDENT


def _opened() -> EngineLoad:
    el = load()
    for t in range(4):
        feed(el, float(t), 0.5, completed=4)
        el.step(float(t), held_back=True, congested=True)
    assert el.mode is Mode.OPEN and el.since == 3.0 and el.resident_rate == 4.0
    return el


def test_open_stays_open_unless_it_clearly_does_not_pay() -> None:
    el = _opened()
    # A little less work than resident (within TIE): still open; no control wins a tie.
    slightly_less = int(4 * (1 - TIE / 2))
    for t in range(4, 100):
        feed(el, float(t), 1.0, completed=slightly_less)
        assert el.step(float(t), held_back=False, congested=True) is Mode.OPEN
    assert el.judged


def test_open_closes_when_it_does_not_pay_and_waits_longer_next_time() -> None:
    el = _opened()  # at t=3, agents cycling every 1.5 s: a dwell is 3 s, judged at t=9
    for t in range(4, 9):
        feed(el, float(t), 1.0, completed=0 if t < 6 else 2)  # warming up, then half
        assert el.step(float(t), held_back=False, congested=True) is Mode.OPEN
    feed(el, 9.0, 1.0, completed=2)
    assert el.step(9.0, held_back=False, congested=True) is Mode.RESIDENT  # 2/s < 4/s
    assert el.backoff == 2.0
    # The next try needs the engine idle twice as long: 6 s instead of 3.
    for t in range(10, 16):
        feed(el, float(t), 0.5)
        assert el.step(float(t), held_back=True, congested=True) is Mode.RESIDENT
    feed(el, 16.0, 0.5)
    assert el.step(16.0, held_back=True, congested=True) is Mode.OPEN


def tick(
    now: float,
    window: int | None,
    *,
    busy: float | None,
    live: int,
    queued: int = 0,
    paused: int = 0,
    working_set: float = 0.9,
    preempt: float = 0.0,
    completed: int = 2,
) -> Observation:
    """A tick where the live working set is ``working_set`` of the cache."""
    return Observation(
        now=now,
        window=window,
        live=live,
        queued=queued,
        paused=paused,
        kv_usage=0.3,
        new_preemptions=preempt,
        capacity_tokens=CAP,
        live_tokens=int(working_set * CAP),
        live_contexts_newest_first=(int(working_set * CAP / live),) * live if live else (),
        interval_s=1.0,
        busy=busy,
        completed=completed,
        latency_s=0.5,
        tool_s=1.0,
    )


def test_a_busy_engine_keeps_the_working_set_resident() -> None:
    p = AIMD(AIMDParams(initial_window=4, start_open=False))
    for t in range(30):  # cache over high, engine busy: pause, as the cache preset does
        d = p.decide(tick(float(t), p.window, busy=0.98, live=4, queued=8))
        assert p.load.mode is Mode.RESIDENT and d.window is not None
    assert d.pause is True and d.window < 4


def test_an_engine_busy_three_quarters_of_the_time_is_kept_resident_by_default() -> None:
    # On the CPU engine, whose prefill is slow, a resident swarm at 75% busy lost 1.2x
    # when opened (the engine-bound swarm at --pace auto): recomputing prefixes costs more
    # than the idle quarter brings. The default opens only under 70%.
    p = AIMD(AIMDParams(initial_window=4, start_open=False))
    for t in range(30):
        d = p.decide(tick(float(t), p.window, busy=0.75, live=4, queued=8))
        assert p.load.mode is Mode.RESIDENT and d.window is not None
    q = AIMD(AIMDParams(initial_window=4, busy_low=0.8, start_open=False))
    for t in range(30):
        q.decide(tick(float(t), q.window, busy=0.75, live=4, queued=8))
    assert q.load.mode is Mode.OPEN


def test_a_decrease_pauses_just_enough_to_bring_the_working_set_under_low() -> None:
    p = AIMD(AIMDParams(initial_window=8, low=0.75, start_open=False))
    # 8 live agents of 12.5k tokens each: 100% of the cache. Under 0.75 means 6 agents.
    d = p.decide(tick(0.0, 8, busy=1.0, live=8, working_set=1.0, queued=1))
    assert (d.window, d.reason, d.pause) == (6, "decrease:pressure", True)


def test_an_idle_engine_opens_the_window_and_pauses_nobody() -> None:
    p = AIMD(AIMDParams(initial_window=4, start_open=False))
    for t in range(5):
        d = p.decide(tick(float(t), p.window, busy=0.4, live=4, queued=8, working_set=0.8))
    assert p.load.mode is Mode.OPEN
    assert (d.window, d.reason, d.pause) == (None, "open", False)
    # Still open and unlimited while requests complete faster than they did resident.
    for t in range(5, 12):
        d = p.decide(tick(float(t), None, busy=1.0, live=12, working_set=2.5, completed=4))
        assert (d.window, d.pause) == (None, False)
    assert p.load.judged


def test_an_open_window_that_did_not_pay_closes_in_from_the_live_agents() -> None:
    # Dwells of two cycles (3 s here): the first loop opens it, the second judges it.
    p = AIMD(
        AIMDParams(
            initial_window=4,
            decrease_cooldown=0.0,
            open_dwell_cycles=2,
            open_dwell=2,
            start_open=False,
        )
    )
    for t in range(5):
        p.decide(tick(float(t), p.window, busy=0.4, live=4, queued=8, working_set=0.8))
    assert p.load.mode is Mode.OPEN
    t = 5.0
    while p.load.mode is Mode.OPEN:  # nothing completes open: judged after two dwells
        d = p.decide(tick(t, None, busy=1.0, live=12, working_set=2.5, completed=0))
        t += 1.0
        assert t < 20.0
    assert d.window is not None and d.window < 12 and d.pause is True


def test_without_a_busy_share_the_law_is_the_cache_law() -> None:
    # No timing (a gate that measures none): the engine-aware part stays out of the way.
    default = AIMD(AIMDParams(initial_window=4, start_open=False))
    cache = AIMD(AIMDParams(initial_window=4, engine_aware=False))
    for t, ws in enumerate([0.5, 0.9, 0.9, 0.95, 0.6, 0.5, 0.9, 1.1, 0.4, 0.3] * 2):
        a = default.decide(
            tick(float(t), default.window, busy=None, live=4, queued=6, working_set=ws)
        )
        b = cache.decide(tick(float(t), cache.window, busy=None, live=4, queued=6, working_set=ws))
        assert (a.window, a.reason, a.pause) == (b.window, b.reason, b.pause)
    assert default.load.mode is Mode.RESIDENT
    cached = build_policy("aimd:cache")
    assert isinstance(cached, AIMD) and cached.params.engine_aware is False


def test_started_open_a_gate_that_times_nothing_gets_the_cache_law() -> None:
    # Started open, the law closes only on the agents' timing: without any (an interval
    # with no busy share measured), it must not stay open for ever.
    p = AIMD()
    start = tick(0.0, None, busy=None, live=4, queued=0, working_set=2.0)
    first = p.decide(dataclasses.replace(start, interval_s=None))  # the first tick
    assert first.window is None
    p.decide(tick(1.0, None, busy=None, live=4, queued=6, working_set=2.0))
    assert p.load.mode is Mode.RESIDENT
    d = p.decide(tick(2.0, p.window, busy=None, live=4, queued=6, working_set=2.0))
    assert d.window is not None and d.window < 4


def test_idle_is_not_judged_before_an_agent_cycle_was_seen() -> None:
    # Requests are running but none has come back from its tool call yet: the dwell of
    # "two cycles" has no length, and an idle reading means nothing.
    el = load(min_dwell_s=0.5)
    for t in range(1, 10):
        el.update(float(t), 1.0, 0.3, 0, latency_s=None, tool_s=None)
        assert el.step(float(t), held_back=True, congested=True) is Mode.RESIDENT
    feed(el, 10.0, 0.3, cycle=1.0)  # the first cycle: from here the dwell counts
    assert el.step(10.0, held_back=True, congested=True) is Mode.RESIDENT
    feed(el, 12.0, 0.3, cycle=1.0)
    assert el.step(12.0, held_back=True, congested=True) is Mode.OPEN


def test_the_quiet_before_a_swarm_does_not_count_as_an_idle_engine() -> None:
    # A sidecar waits an hour with no agent; then a swarm saturates the engine. (A short
    # dwell, so that an average still holding the quiet would open within it.)
    p = AIMD(AIMDParams(initial_window=4, open_dwell=0.5, open_dwell_cycles=0.5, start_open=False))
    for t in range(3600):
        p.decide(tick(float(t), p.window, busy=0.0, live=0, working_set=0.0, completed=0))
    for t in range(3600, 3630):
        d = p.decide(tick(float(t), p.window, busy=1.0, live=4, queued=12))
        assert p.load.mode is Mode.RESIDENT and d.window is not None


def bound(now: float, *, live: int = 16, latency: float = 4.0, tool: float = 1.0) -> Observation:
    """A tick of an open swarm whose working set is 2.5x the cache, its agents spending
    ``latency`` s in the engine per ``tool`` s of tool call."""
    obs = tick(now, None, busy=1.0, live=live, working_set=2.5)
    return dataclasses.replace(obs, latency_s=latency, tool_s=tool)


def test_it_starts_open_and_stays_open_while_the_agents_mostly_work_in_tools() -> None:
    p = AIMD()
    assert p.initial_window() is None and p.load.mode is Mode.OPEN
    # The cache is 2.5x over and the engine always busy, but the agents spend 40% of their
    # cycle in it: holding them back would idle it, the cache law's 1.6x loss.
    for t in range(120):
        d = p.decide(bound(float(t), latency=2.0, tool=3.0))
        assert (d.window, d.pause, d.reason) == (None, False, "open")
    # Without the engine-aware part, or told to, it starts resident at its initial window.
    assert AIMD(AIMDParams(engine_aware=False)).initial_window() == 8
    assert AIMD(AIMDParams(start_open=False)).initial_window() == 8


def test_open_closes_once_the_agents_wait_on_the_engine_for_a_cycle() -> None:
    p = AIMD(AIMDParams(decrease_cooldown=0.0))
    # The agents first work mostly in tools (1 s in the engine per 3 s of tool call) ...
    for t in range(10):
        assert p.decide(bound(float(t), latency=1.0, tool=3.0)).window is None, t
    # ... then spend 4 s in it per 1 s of tool call: the share climbs over share_high
    # (0.75) and must stay over for one cycle (about 5 s) before the law closes.
    closed = None
    for t in range(10, 40):
        d = p.decide(bound(float(t)))
        if d.window is not None:
            closed = t
            break
    assert closed is not None and closed >= 10 + 5, closed
    assert p.load.mode is Mode.RESIDENT and p.load.backoff == 2.0
    # Closed in from the 16 agents running, and down to the working set that fits.
    assert d.window is not None and d.window < 16 and d.pause is True


def test_a_first_reading_over_the_share_is_a_whole_cycle_already() -> None:
    # Every agent queued behind one prefill backlog: the first request back took 20 s,
    # its tool call 1 s. That reading is one whole cycle of waiting on the engine, so
    # the law closes on it instead of waiting one more (now 21 s long) cycle.
    p = AIMD(AIMDParams(decrease_cooldown=0.0))
    for t in range(20):  # nothing has come back yet
        obs = tick(float(t), None, busy=1.0, live=16, working_set=2.5, completed=0)
        obs = dataclasses.replace(obs, latency_s=None, tool_s=None)
        assert p.decide(obs).window is None, t
    d = p.decide(bound(20.0, latency=20.0, tool=1.0))
    assert p.load.mode is Mode.RESIDENT and d.window is not None and d.window < 16
    # A first reading under the share (a start burst that cleared quickly) dates nothing
    # back: the law stays open until the share has held over it for a cycle of its own.
    q = AIMD()
    q.decide(bound(20.0, latency=1.0, tool=3.0))
    assert q.load.mode is Mode.OPEN
    assert q.decide(bound(21.0, latency=4.0, tool=1.0)).window is None


def test_a_short_spell_of_waiting_or_an_uncongested_cache_keeps_it_open() -> None:
    p = AIMD()
    for t in range(60):  # over the share for 3 s of every 10: never for a whole cycle
        slow = t % 10 >= 7
        d = p.decide(bound(float(t), latency=4.0 if slow else 1.0, tool=1.0 if slow else 3.0))
        assert d.window is None, t
    q = AIMD()
    for t in range(60):  # waiting on the engine, but the working set fits: nothing to save
        obs = dataclasses.replace(bound(float(t)), live_tokens=CAP // 2)
        assert q.decide(obs).window is None


def test_a_retune_keeps_the_mode_it_finds() -> None:
    p = AIMD()
    assert p.resume_from(None, live=12) is None and p.load.mode is Mode.OPEN
    q = AIMD()
    assert q.resume_from(6, live=12) == 6 and q.load.mode is Mode.RESIDENT
    r = AIMD(AIMDParams(start_open=False))
    assert r.resume_from(None, live=12) == 12 and r.load.mode is Mode.RESIDENT
