"""bench/real_engine.py: a regime paced to a slower engine keeps its draws."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from real_engine import _pace, regime_trace, sim_policy


@pytest.mark.parametrize("regime", ["tool-bound", "engine-bound", "staggered"])
def test_pace_multiplies_pauses_and_arrivals_and_keeps_the_tokens(regime: str) -> None:
    plain, paced = regime_trace(regime, 0, 1.0), regime_trace(regime, 0, 2.5)
    assert len(plain.agents) == len(paced.agents)
    for a, b in zip(plain.agents, paced.agents, strict=True):
        assert b.arrival_s == pytest.approx(2.5 * a.arrival_s, abs=0.003)
        assert [(s.input_tokens, s.output_tokens) for s in a.steps] == [
            (s.input_tokens, s.output_tokens) for s in b.steps
        ]
        for s, t in zip(a.steps, b.steps, strict=True):
            assert t.tool_latency_s == pytest.approx(2.5 * s.tool_latency_s, abs=0.003)
    assert any(a.steps[0].tool_latency_s > 0 for a in plain.agents)


def test_pace_option_takes_a_positive_number_or_auto() -> None:
    assert _pace("auto") == "auto"
    assert _pace("1.5") == 1.5
    for bad in ("0", "-1", "nan", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            _pace(bad)


def test_a_policy_variant_sets_its_parameters_in_the_simulator_too() -> None:
    spec, settings = sim_policy("aimd+busy_low=0.5+share_high=0.6")
    assert spec == "aimd"
    assert settings.aimd.busy_low == 0.5 and settings.aimd.share_high == 0.6
    assert sim_policy("none")[0] == "unlimited"
    spec, settings = sim_policy("static:4")
    assert spec == "static:4" and settings.aimd.busy_low == 0.7
