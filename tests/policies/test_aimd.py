"""AIMD's window (resident mode): grows only while used, halves on congestion, cooldown,
bounds, paper preset. Starting open is tested with the engine-aware part (test_engine_load)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from concur.policies import AIMD, AIMDParams, Observation, build_policy
from concur.policies.registry import PolicySettings

CAP = 100_000


def obs(
    now: float,
    window: int,
    *,
    kv: float | None = None,
    live: int = 0,
    queued: int = 0,
    live_tokens: int = 0,
    hit: float | None = None,
    preempt: float | None = 0.0,
    paused: int = 0,
    draining: int = 0,
    contexts: tuple[int, ...] = (),
) -> Observation:
    return Observation(
        now=now,
        window=window,
        live=live,
        queued=queued,
        paused=paused,
        draining=draining,
        kv_usage=kv,
        hit_rate=hit,
        new_preemptions=preempt,
        capacity_tokens=CAP,
        live_tokens=live_tokens or sum(contexts),
        live_contexts_newest_first=contexts,
    )


def test_grows_only_while_window_in_use() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=4, alpha=2))
    # Low pressure but only 1 of 4 slots used and nobody waiting: hold.
    d = p.decide(obs(0, 4, kv=0.1, live=1))
    assert (d.window, d.reason) == (4, "hold")
    # Window full: grow by alpha.
    d = p.decide(obs(1, 4, kv=0.1, live=4))
    assert (d.window, d.reason) == (6, "increase")
    # Agents queued: grow again.
    d = p.decide(obs(2, 6, kv=0.1, live=3, queued=5))
    assert d.window == 8
    assert d.release_limit == 2


def test_no_growth_between_low_and_high() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=4))
    d = p.decide(obs(0, 4, kv=0.75, live=4, queued=3))
    assert (d.window, d.reason) == (4, "hold")


def test_halves_on_pressure_and_cooldown_holds() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=16, decrease_cooldown=5.0))
    d = p.decide(obs(9.0, 16, kv=0.9, live=16))
    assert (d.window, d.reason) == (16, "confirm")
    d = p.decide(obs(10.0, 16, kv=0.9, live=16))
    assert (d.window, d.reason) == (8, "decrease:pressure")
    assert d.pause is True
    # Still congested 1 s later: cooldown holds the window.
    d = p.decide(obs(11.0, 8, kv=0.95, live=16))
    assert (d.window, d.reason) == (8, "cooldown")
    # After the cooldown: halves again.
    d = p.decide(obs(15.0, 8, kv=0.95, live=16))
    assert d.window == 4


def test_working_set_pressure_counts_live_agents() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=16))
    # KV usage low, but live agents' contexts are 90% of capacity: congestion.
    d = p.decide(obs(0, 16, kv=0.2, live=16, live_tokens=int(0.9 * CAP)))
    assert d.window == 8
    assert d.parts["working_set"] == pytest.approx(0.9)
    assert d.pressure == pytest.approx(0.9)


def test_kv_only_pressure_ignores_working_set() -> None:
    p = build_policy("aimd:kv")
    assert isinstance(p, AIMD)
    d = p.decide(obs(0, 8, kv=0.2, live=8, live_tokens=int(0.9 * CAP)))
    assert d.window == 9 and d.reason == "increase"


def test_engine_signals_wait_while_paused_agents_steps_drain() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=8))
    # KV usage and preemptions over the line, the live working set well under it, and
    # paused agents' steps still in the engine: no cut.
    d = p.decide(obs(0, 8, kv=0.95, live=8, paused=4, draining=2, live_tokens=CAP // 2))
    assert (d.window, d.reason) == (8, "draining")
    d = p.decide(obs(1, 8, kv=0.5, live=8, paused=4, draining=2, preempt=3))
    assert (d.window, d.reason) == (8, "draining")
    # Once they ended, the same reading cuts (once it lasts: readings under the drain
    # do not count towards it).
    d = p.decide(obs(2, 8, kv=0.95, live=8, paused=4, live_tokens=CAP // 2))
    assert (d.window, d.reason) == (8, "confirm")
    d = p.decide(obs(3, 8, kv=0.95, live=8, paused=4, live_tokens=CAP // 2))
    assert (d.window, d.reason) == (4, "decrease:pressure")


def test_an_overfull_working_set_cuts_even_while_others_drain() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=8))
    contexts = (12_000,) * 8
    d = p.decide(obs(0, 8, kv=0.95, live=8, paused=2, draining=2, contexts=contexts))
    # The live agents' own contexts are over high: cut to those under low (6 x 12,000).
    assert (d.window, d.reason) == (6, "decrease:pressure")


def test_kv_usage_alone_cuts_only_once_it_lasts() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=8, kv_confirm=1.0))
    half = CAP // 2  # the live working set, well under high
    # One reading over high (the gauge as steps end): no cut, nobody paused beyond the
    # window; the next reading is under it, and the clock starts again.
    d = p.decide(obs(0.0, 8, kv=0.92, live=8, live_tokens=half))
    assert (d.window, d.reason) == (8, "confirm")
    d = p.decide(obs(1.0, 8, kv=0.8, live=8, live_tokens=half))
    assert (d.window, d.reason) == (8, "hold")
    d = p.decide(obs(2.0, 8, kv=0.92, live=8, live_tokens=half))
    assert (d.window, d.reason) == (8, "confirm")
    d = p.decide(obs(2.5, 8, kv=0.92, live=8, live_tokens=half))
    assert (d.window, d.reason) == (8, "confirm")
    # Over high for kv_confirm seconds: it is the live agents' cache after all.
    d = p.decide(obs(3.0, 8, kv=0.92, live=8, live_tokens=half))
    assert (d.window, d.reason) == (4, "decrease:pressure")


def test_kv_usage_with_preemptions_or_an_overfull_working_set_cuts_at_once() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=8, kv_confirm=1.0))
    d = p.decide(obs(0.0, 8, kv=0.92, live=8, live_tokens=CAP // 2, preempt=2))
    assert (d.window, d.reason) == (4, "decrease:pressure")
    p = AIMD(AIMDParams(start_open=False, initial_window=8, kv_confirm=1.0))
    d = p.decide(obs(0.0, 8, kv=0.92, live=8, contexts=(12_000,) * 8))
    assert (d.window, d.reason) == (6, "decrease:pressure")  # 6 x 12,000 under low


def test_kv_presets_cut_on_one_reading() -> None:
    for spec in ("aimd:kv", "aimd:paper"):
        assert build_policy(spec).params.kv_confirm == 0.0  # type: ignore[attr-defined]


def test_preemptions_are_congestion() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=10))
    d = p.decide(obs(0, 10, kv=0.3, live=10, preempt=3))
    assert (d.window, d.reason) == (5, "decrease:preemptions")
    assert d.pause is False  # pausing needs pressure above high, not just preemptions


def test_unknown_pressure_holds() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=10, pressure=("kv",)))
    d = p.decide(obs(0, 10, kv=None, live=10, queued=4, preempt=None))
    assert (d.window, d.pressure) == (10, None)


def test_paper_preset_reproduces_the_paper_rule() -> None:
    p = build_policy("aimd:paper")
    assert isinstance(p, AIMD)
    prm = p.params
    assert (prm.low, prm.high, prm.hit_floor, prm.alpha, prm.beta) == (0.2, 0.5, 0.2, 2, 0.5)
    assert prm.pressure == ("kv",)
    # High usage but a healthy hit rate: no decrease (the paper needs both).
    d = p.decide(obs(0, 8, kv=0.6, live=8, hit=0.8))
    assert d.window == 8
    # High usage and a collapsed hit rate: multiplicative decrease.
    d = p.decide(obs(1, 8, kv=0.6, live=8, hit=0.1))
    assert d.window == 4
    # Usage below U_low and the window in use: +alpha (2).
    d = p.decide(obs(10, 4, kv=0.1, live=4, hit=0.9))
    assert d.window == 6
    # Between 0.2 and 0.5: hold.
    d = p.decide(obs(11, 6, kv=0.3, live=6, hit=0.1))
    assert d.window == 6


def test_preset_yields_to_explicit_fields() -> None:
    settings_ = PolicySettings(aimd=AIMDParams(alpha=3))
    p = build_policy("aimd:paper", settings_)
    assert isinstance(p, AIMD)
    assert p.params.alpha == 3 and p.params.high == 0.5


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"low": 0.9, "high": 0.8}, "low (0.9) must be below high (0.8)"),
        ({"beta": 1.5}, "less than 1"),
        ({"min_window": 10, "max_window": 5}, "must not exceed max_window"),
        ({"initial_window": 100, "max_window": 50}, "initial_window (100)"),
        ({"pressure": "kv,bogus"}, "unknown pressure source 'bogus'"),
    ],
)
def test_bad_parameters_are_rejected_with_a_reason(
    kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ValidationError) as err:
        AIMDParams(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(err.value)


@settings(max_examples=300, deadline=None)
@given(
    min_w=st.integers(1, 8),
    span=st.integers(0, 40),
    alpha=st.integers(1, 5),
    beta=st.floats(0.05, 0.95),
    steps=st.lists(
        st.tuples(
            st.floats(0, 1.4),  # kv usage
            st.integers(0, 100),  # live
            st.integers(0, 50),  # queued
            st.integers(0, 3),  # preemptions
            st.floats(0, 3),  # time step
        ),
        max_size=60,
    ),
)
def test_window_never_leaves_bounds(
    min_w: int, span: int, alpha: int, beta: float, steps: list[tuple[float, int, int, int, float]]
) -> None:
    max_w = min_w + span
    prm = AIMDParams(
        min_window=min_w,
        max_window=max_w,
        initial_window=min_w,
        alpha=alpha,
        beta=beta,
        decrease_cooldown=1.0,
        start_open=False,
    )
    p = AIMD(prm)
    now = 0.0
    for kv, live, queued, pre, dt in steps:
        now += dt
        d = p.decide(obs(now, p.window, kv=kv, live=live, queued=queued, preempt=pre))
        assert d.window is not None
        assert min_w <= d.window <= max_w


def test_fit_increase_admits_what_fits_at_once() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=4, low=0.7, high=0.85))
    o = Observation(
        now=0,
        window=4,
        live=4,
        queued=6,
        kv_usage=0.1,
        capacity_tokens=CAP,
        live_tokens=20_000,
        candidate_contexts=(10_000,) * 6,
    )
    d = p.decide(o)
    # 20k + 5 x 10k = 70k <= 0.7 x 100k; the sixth would not fit.
    assert (d.window, d.reason, d.release_limit) == (9, "increase", 5)


def test_additive_increase_probes_one_step_at_a_time() -> None:
    p = AIMD(AIMDParams(start_open=False, initial_window=4, increase="additive"))
    o = Observation(
        now=0,
        window=4,
        live=4,
        queued=6,
        kv_usage=0.1,
        capacity_tokens=CAP,
        live_tokens=20_000,
        candidate_contexts=(10_000,) * 6,
    )
    assert p.decide(o).window == 5
