"""``concur swarm`` stopped with Ctrl-C ends its agents and prints its summary (issue
18, point 1): a harness that exits frees its slots at once, not at an idle timeout."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from fakes.fake_vllm import FakeVLLM
from fakes.harness import Start, assert_openai_error, chat, record_events, wait_for


async def test_swarm_interrupted_ends_its_agents_and_prints_its_summary(
    start_concur: Start, fake: FakeVLLM, tmp_path: Path
) -> None:
    c = await start_concur(**{"policy.name": "static:4"})
    gate = c.runtime.gate
    events = record_events(c)
    trace = tmp_path / "trace.jsonl"
    steps = [{"input_tokens": 5, "output_tokens": 2, "tool_latency_s": 600.0}] * 3
    trace.write_text(
        "".join(
            json.dumps({"agent_id": f"a{i}", "arrival_s": 0.0 if i < 2 else 900.0, "steps": steps})
            + "\n"
            for i in range(3)
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "concur.cli",
        "swarm",
        "--trace",
        str(trace),
        "--base-url",
        c.url,
        "--model",
        "m",
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for(
            lambda: gate.live == 2 and all(a.in_flight == 0 for a in gate.agents()),
            within=20,
            what="two agents in their tool calls",
        )
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "agents: 0/3 finished, 3 interrupted" in out.decode()
    assert "interrupted" in err.decode()
    # Ended when the swarm stopped, before it exited: not left to an idle timeout.
    assert gate.active == 0
    assert sorted(e.agent_id for e in events if e.kind == "ended" and e.detail == "deleted") == [
        "a0",
        "a1",
    ]


async def test_an_agent_may_end_itself_but_no_other(start_concur: Start, fake: FakeVLLM) -> None:
    c = await start_concur()
    gate = c.runtime.gate
    for agent in ("me", "other"):
        r = await c.client.post(
            "/v1/chat/completions", json=chat(), headers={"X-Concur-Agent-Id": agent}
        )
        assert r.status_code == 200
    r = await c.client.delete("/concur/agents/other", headers={"X-Concur-Agent-Id": "me"})
    assert_openai_error(r, 403)  # admin endpoints disabled: no token configured
    r = await c.client.delete("/concur/agents/me", headers={"X-Concur-Agent-Id": "me"})
    assert r.status_code == 200 and r.json() == {"ended": "me"}
    assert gate.get("me") is None and gate.get("other") is not None
    r = await c.client.delete("/concur/agents/other", headers={"X-Concur-Agent-Id": "other"})
    assert r.status_code == 200
