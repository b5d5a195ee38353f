"""bench/real_engine.py's speed probe against the live server: a cold prefill against
cpu-tiny's fit, the factor ``--pace auto`` multiplies the regimes' pauses by."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from concur.sim.realvllm import VllmServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from real_engine import probe_speed

pytestmark = [pytest.mark.vllm]


def test_probe_times_a_cold_prefill_against_the_fit(vllm_server: VllmServer) -> None:
    first = probe_speed(vllm_server.url, tokens=4096)
    second = probe_speed(vllm_server.url, tokens=4096)
    # Both cold (the probe empties the cache before and after): they agree within the
    # machine's noise, far from the 10x a cached prompt would show.
    assert math.isfinite(first) and first > 0.0
    assert 0.33 < first / second < 3.0
