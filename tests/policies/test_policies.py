"""static, unlimited, fit, epp, pressure sources, the registry and the growth estimator."""

from __future__ import annotations

import pytest

from concur.policies import (
    EPP,
    Fit,
    FitParams,
    GrowthEstimator,
    Observation,
    PolicyError,
    Static,
    Unlimited,
    build_policy,
)
from concur.policies import pressure as pressure_mod


def test_static_and_unlimited() -> None:
    s = build_policy("static:12")
    assert isinstance(s, Static)
    assert s.initial_window() == 12
    assert s.decide(Observation(now=0, window=12, kv_usage=0.99)).window == 12
    u = build_policy("unlimited")
    assert isinstance(u, Unlimited)
    assert u.initial_window() is None
    assert u.decide(Observation(now=0, window=None, kv_usage=0.99)).window is None


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("bogus", "unknown policy 'bogus'; allowed: aimd, static, unlimited, fit, epp"),
        ("static:x", "static:N needs a whole number"),
        ("static:0", "N >= 1"),
        ("aimd:nope", "unknown aimd preset 'nope'"),
        ("fit:3", "takes no ':' argument"),
    ],
)
def test_bad_specs(spec: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=None) as err:
        build_policy(spec)
    assert fragment in str(err.value)


def test_pressure_sources_combine_by_max() -> None:
    o = Observation(
        now=0, window=4, kv_usage=0.3, capacity_tokens=1000, live_tokens=500, growth_tokens=300
    )
    parts = pressure_mod.parts(o)
    assert parts == {"kv": 0.3, "working_set": 0.5, "projected": 0.8}
    assert pressure_mod.combine(parts, ("kv",)) == 0.3
    assert pressure_mod.combine(parts, ("kv", "working_set")) == 0.5
    assert pressure_mod.combine(parts, ("kv", "projected")) == 0.8
    assert pressure_mod.parse_sources("max(kv, working_set)") == ("kv", "working_set")
    unknown = Observation(now=0, window=4)
    assert pressure_mod.combine(pressure_mod.parts(unknown), ("kv", "working_set")) is None


def test_fit_admits_what_fits_under_low() -> None:
    p = Fit(FitParams(low=0.7, high=0.9, pressure=("working_set",)))
    o = Observation(
        now=0,
        window=2,
        live=2,
        capacity_tokens=1000,
        live_tokens=400,
        candidate_contexts=(100, 150, 100),
    )
    d = p.decide(o)
    # 400 + 100 = 500 fits, + 150 = 650 fits, + 100 = 750 > 700 does not.
    assert d.window == 4 and not d.pause


def test_fit_pauses_newest_until_under_high() -> None:
    p = Fit(FitParams(low=0.7, high=0.9, pressure=("working_set",)))
    o = Observation(
        now=0,
        window=5,
        live=5,
        capacity_tokens=1000,
        live_tokens=1100,
        live_contexts_newest_first=(150, 100, 300, 300, 250),
    )
    d = p.decide(o)
    # 1100 -> drop newest 150 -> 950 (> 900) -> drop 100 -> 850: 3 live remain.
    assert d.window == 3 and d.pause


def test_epp_holds_requests_while_saturated() -> None:
    p = EPP()
    assert p.decide(Observation(now=0, window=None, kv_usage=0.85)).hold_requests
    assert p.decide(Observation(now=0, window=None, kv_usage=0.5, engine_waiting=6)).hold_requests
    d = p.decide(Observation(now=0, window=None, kv_usage=0.5, engine_waiting=2))
    assert not d.hold_requests and d.window is None


def test_growth_estimator_learns_online() -> None:
    g = GrowthEstimator()
    assert g.remaining_growth(3) == 0.0
    for step in range(1, 5):
        g.observe_step(1000, step)
    # No agent has ended: assume agents run at least as long as the longest seen (4 steps).
    assert g.remaining_growth(1) == pytest.approx(3000)
    g.observe_end(10)
    g.observe_end(20)
    assert g.expected_steps == 15
    assert g.remaining_growth(5) == pytest.approx(10 * 1000)
    assert g.remaining_growth(30) == 0.0
