"""``concur demo --vllm``: both halves on a real vLLM (CPU build), through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

DEMO = [sys.executable, "-m", "concur", "demo"]


def test_demo_on_a_real_vllm(tmp_path: Path) -> None:
    # tool-bound is the shortest regime (~45 s a half); its engine idles between steps.
    proc = subprocess.run(
        [*DEMO, "--vllm", "--shape", "tool-bound", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "vLLM 0.32 (CPU build)" in out and "real time" in out
    assert "makespan (s)" in out and "prefix cache emptied" in out
    data = json.loads((tmp_path / "demo.json").read_text())
    direct = data["runs"]["no control"]["figures"]
    controlled = data["runs"]["concur (aimd)"]["figures"]
    for run in (direct, controlled):
        assert run["finished_agents"] == run["agents"] == 16
        assert run["errors"] == {}
        # Counted over the run only: the engine served both halves.
        assert 0.0 <= run["hit_rate"] <= 1.0
        assert run["computed_prompt_tokens"] > 0
    # The second half ran on an emptied cache: its first prompts were computed again.
    assert controlled["computed_prompt_tokens"] >= 16 * 2000
    assert data["meta"]["scenario"]["preset"] == "cpu-tiny"
    assert "concur (aimd)" in data["meta"]["story"]
    assert (tmp_path / "demo.png").exists() and (tmp_path / "logs" / "vllm.log").exists()


def test_demo_refuses_sim_flags_with_vllm(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*DEMO, "--vllm", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--quick and --speed do not apply with --vllm" in proc.stderr
