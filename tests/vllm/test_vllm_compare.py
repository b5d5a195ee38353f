"""``concur sim compare-engines``: both engines side by side on a small trace.

Runs only with the vllm extra: ``make test-vllm`` (``pytest -m vllm``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from concur.sim.compare import compare_engines, markdown, register_compare
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SPEC = EngineSpec(model="llama-3-8b", gpu="h100", tp=1, kv_capacity_tokens=16 * 300)


def test_compare_engines_puts_both_engines_side_by_side() -> None:
    trace = generate("tiny", 1)
    cmp = compare_engines(trace, "tiny", ["unlimited", "static:2"], SPEC, workers=1)
    assert [r.policy for r in cmp.rows] == ["unlimited", "static:2"]
    for row in cmp.rows:
        assert row.builtin.engine == "builtin" and row.vllm.engine == "vllm"
        assert row.builtin.summary.finished_agents == row.vllm.summary.finished_agents == 8
        assert row.builtin.summary.output_tokens == row.vllm.summary.output_tokens
        assert row.makespan_ratio == pytest.approx(
            row.builtin.summary.makespan_s / row.vllm.summary.makespan_s
        )
        assert row.builtin.wall_s > 0 and row.vllm.wall_s > 0
    assert sorted(cmp.ranking("vllm")) == ["static:2", "unlimited"]
    table = markdown(cmp)
    assert "| unlimited |" in table and "| static:2 |" in table
    assert ("PASS" in table) == cmp.passes()


def test_compare_engines_command_writes_reports(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="concur sim")
    register_compare(parser.add_subparsers())
    out = tmp_path / "cmp"
    args = parser.parse_args(
        [
            "compare-engines",
            "--shape",
            "tiny",
            "--seed",
            "2",
            "--model",
            "llama-3-8b",
            "--tp",
            "1",
            "--kv-tokens",
            str(16 * 300),
            "--policy",
            "unlimited",
            "--policy",
            "aimd",
            "--jobs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    data = json.loads((out / "fidelity.json").read_text())
    (trace,) = data["traces"]
    assert [p["policy"] for p in trace["policies"]] == ["unlimited", "aimd"]
    assert all(p["vllm"]["finished_agents"] == 8 for p in trace["policies"])
    assert "| aimd |" in (out / "fidelity.md").read_text()
