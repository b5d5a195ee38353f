"""bench/engine_costs.py: the fit leaves out decode series whose streams did not batch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import engine_costs as ec

TRUE = {
    "base_s": 1.2e-3,
    "per_token_s": 1.6e-5,
    "per_seq_s": 8e-5,
    "per_pair_s": 1.2e-8,
    "per_kv_s": 4e-8,
}


def _engine(rows: np.ndarray) -> np.ndarray:
    return rows @ np.array([TRUE[k] for k in ec.ENGINE_TERMS])


def _series() -> tuple[list[ec.Prefill], list[ec.Decode]]:
    prefills = [
        ec.Prefill(p, c, 0.0, 0.0) for p, c in ((512, 0), (4096, 0), (16384, 0), (9216, 8192))
    ]
    decodes = [
        ec.Decode(n, c, 0.0, 0.0) for c in (1024, 2048, 4096) for n in (1, 4, 16) if n * c <= 16384
    ]
    a, _ = ec.design(prefills, decodes)
    y = _engine(a)
    for p, t in zip(prefills, y[: len(prefills)], strict=True):
        p.seconds = p.client_seconds = float(t)
    for d, t in zip(decodes, y[len(prefills) :], strict=True):
        d.step_seconds, d.client_step_seconds = float(t), float(t) * 1.05
    return prefills, decodes


def test_the_fit_recovers_the_decode_cost_per_context_token() -> None:
    prefills, decodes = _series()
    coef = ec.fit(prefills, decodes)
    assert coef["per_kv_s"] == pytest.approx(TRUE["per_kv_s"], rel=0.05)


def test_a_series_whose_streams_ran_one_after_another_is_left_out() -> None:
    prefills, decodes = _series()
    # 8 streams run one after another: vLLM's step is a single stream's, the client's 8x.
    single = decodes[0].step_seconds
    serial = ec.Decode(8, 2048, single, 8 * single)
    assert ec.batched([*decodes, serial]) == decodes
    coef = ec.fit(prefills, [*decodes, serial])
    assert coef["per_kv_s"] == pytest.approx(TRUE["per_kv_s"], rel=0.05)
    # The serving stack's pace comes from batched series only (16 streams: ~1.05x vLLM's).
    assert coef["frontend_per_seq_s"] < 2 * single
