"""The demo's closing text and picture come from the runs' own data: what concur did
(the window at the start, agents paused and queued, time open) and no limit drawn as such."""

from __future__ import annotations

import math
from typing import Any

from concur.sim.demo.monitor import Sample
from concur.sim.demo.plot import LABELS, figure
from concur.sim.demo.report import HITS, PROMPT, QUERIES, RunRecord
from concur.sim.demo.story import Held, held_back, story, timeline

AIMD = {"name": "aimd", "initial_window": 2, "increase": "fit", "low": 0.75}


def _swarm(makespan: float, agents: int = 6) -> dict[str, Any]:
    return {
        "makespan_s": makespan,
        "makespan_wall_s": makespan / 10,
        "output_tok_per_s": 100.0,
        "mean_completion_s": makespan / 2,
        "finished_agents": agents,
        "agents": agents,
        "errors": {},
    }


def _engine(hit_rate: float, prompt: float = 10_000.0) -> dict[str, float]:
    return {HITS: hit_rate * prompt, QUERIES: prompt, PROMPT: prompt}


def direct(makespan: float = 300.0) -> RunRecord:
    agents = [
        {"agent_id": f"a{i}", "arrival_s": 0.0, "end_s": 100.0 * (1 + i % 3)} for i in range(6)
    ]
    samples = [
        Sample(t=t, kv_usage=0.9, hit_rate=0.2, running=6, waiting=0, preemptions_total=0)
        for t in (0.0, 50.0, 150.0, 300.0)
    ]
    return RunRecord("no control", _swarm(makespan), _engine(0.2), samples, 5_000, None, agents)


def _c(
    t: float,
    window: int | None,
    live: int,
    paused: int = 0,
    queued: int = 0,
    decision: str = "hold",
) -> Sample:
    return Sample(
        t=t,
        kv_usage=0.5,
        hit_rate=0.8,
        running=2,
        waiting=0,
        preemptions_total=0,
        window=window,
        active=live + paused,
        live=live,
        paused=paused,
        queued=queued,
        decision=decision,
    )


CONTROLLED_SAMPLES = [
    _c(0, 2, 0),
    _c(1, 4, 4, queued=2, decision="increase"),  # the window opened past its initial 2
    _c(2, 2, 2, paused=2, queued=2, decision="decrease:pressure"),
    _c(3, None, 4, decision="open"),
    _c(5, None, 6, decision="open"),
    _c(6, 3, 3, paused=1, decision="hold"),
    _c(8, 3, 0),
]


def controlled(
    samples: list[Sample] | None = None, makespan: float = 150.0, hit: float = 0.8
) -> RunRecord:
    return RunRecord(
        "concur (aimd)",
        _swarm(makespan),
        _engine(hit, prompt=8_000.0),
        CONTROLLED_SAMPLES if samples is None else samples,
        5_000,
        {"policy": AIMD, "active": 0, "queued": 0},
        [],
    )


def test_the_text_says_what_concur_did_from_the_samples() -> None:
    text = story(direct(), controlled())
    assert text.startswith(
        "concur (aimd) finished the swarm 2.00x faster than no control (150 vs 300 simulated s), "
        "prefix-cache hit rate 80% vs 20%"
    )
    assert "At the start it let 4 agents run at once within 1 s (window 2 → 4): by design" in text
    assert "fits under 75% of the KV cache" in text
    assert (
        "It held up to 4 of 6 agents back at once (up to 2 paused at step boundaries, "
        "up to 2 queued before their first request)." in text
    )
    assert "For 3 s it was open (no limit, nobody paused" in text
    assert "queued the rest" not in text


def test_the_text_follows_the_data_when_concur_held_nobody_back_or_lost() -> None:
    calm = [_c(0, 2, 0), _c(5, 2, 2), _c(10, 2, 0)]
    text = story(direct(), controlled(calm, makespan=450.0, hit=0.2))
    assert (
        "concur (aimd) was 1.50x slower than no control on this run (450 vs 300 simulated s)"
        in text
    )
    assert "It never held an agent back" in text
    assert "At the start" not in text and "open" not in text
    assert "prefixes stayed" not in text
    paused_only = [_c(0, 2, 0), _c(5, 2, 2), _c(10, 1, 1, paused=1), _c(15, 1, 0)]
    text = story(direct(), controlled(paused_only))
    assert (
        "It held up to 1 of 6 agents back at once (up to 1 paused at step boundaries, none queued)."
        in text
    )


def test_the_text_says_when_the_law_started_open_and_why_it_closed() -> None:
    policy = {**AIMD, "start_open": True, "share_high": 0.75}
    closed = [
        _c(0, None, 6, decision="open"),
        _c(4, None, 6, decision="open"),
        _c(5, 3, 3, paused=3, decision="decrease:pressure"),
        _c(9, None, 6, decision="open"),
        _c(11, 3, 3, paused=3, decision="hold"),
        _c(12, 3, 0),
    ]
    record = controlled(closed)
    record.proxy_status = {"policy": policy, "active": 0, "queued": 0}
    text = story(direct(), record)
    assert "It started open (no limit, nobody held back, shaded in the plot)" in text
    assert (
        "At 5 s it closed in: the cache was congested and the agents had spent more than 75%"
        in text
    )
    assert "For 2 s it was open again (no limit, nobody paused" in text
    assert "At the start it let" not in text
    stayed = [_c(0, None, 6, decision="open"), _c(10, None, 6, decision="open")]
    record = controlled(stayed)
    record.proxy_status = {"policy": policy, "active": 0, "queued": 0}
    text = story(direct(), record)
    assert "It stayed open: the agents never waited on the engine for most of a cycle" in text
    assert "it was open again" not in text and "It never held an agent back" not in text


def test_timelines_of_both_runs() -> None:
    tl = timeline(controlled())
    assert tl.controlled and tl.window == [2, 4, 2, None, None, 3, 3]
    assert tl.no_limit == [(3, 6, "open")]
    assert held_back(tl) == Held(most=4, paused=2, queued=2, open_s=3.0)
    base = timeline(direct())
    # Every arrived agent runs until it ends: 6, then 4 after t=100, 2 after t=200.
    assert not base.controlled and set(base.window) == {None}
    assert base.no_limit == [(0.0, 300.0, "no control")]
    assert [base.live[base.t.index(t)] for t in (0.0, 150.0, 200.0, 300.0)] == [6, 4, 2, 0]
    assert set(base.paused) == set(base.queued) == {0}


def _top(ax: Any, label: str) -> float:
    (coll,) = [c for c in ax.collections if c.get_label() == label]
    return max(float(v[1]) for p in coll.get_paths() for v in p.vertices)


def test_the_picture_draws_both_runs_agents_window_and_no_limit() -> None:
    import matplotlib.pyplot as plt

    fig = figure(direct(), controlled(), "title")
    try:
        no_control, concur = fig.axes[0], fig.axes[1]  # the top row: agents
        # concur: live, paused and queued stacked under the window; the open span shaded.
        assert _top(concur, LABELS["live"]) == 6  # t=5: 6 live
        assert _top(concur, LABELS["queued"]) == 6  # t=1 and t=2: live + paused + queued
        (window,) = [ln for ln in concur.get_lines() if ln.get_label() == LABELS["window"]]
        ys = [float(y) for y in window.get_ydata()]
        assert ys[:3] == [2, 4, 2] and math.isnan(ys[3]) and math.isnan(ys[4]) and ys[5] == 3
        (span,) = [p for p in concur.patches if p.get_label() == LABELS["open"]]
        assert (span.get_x(), span.get_width()) == (3, 3)
        assert any("window 2 → 4" in t.get_text() for t in concur.texts)
        # no control: every agent live, no window line, the whole run shaded as no limit.
        assert _top(no_control, LABELS["live"]) == 6
        assert not [ln for ln in no_control.get_lines() if ln.get_label() == LABELS["window"]]
        (span,) = [p for p in no_control.patches if p.get_label() == LABELS["no control"]]
        assert (span.get_x(), span.get_width()) == (0.0, 300.0)
        # KV usage and hit rate for both runs, one legend for the whole figure.
        for ax in fig.axes[2:4]:
            assert [ln.get_label() for ln in ax.get_lines()] == [LABELS["kv"]]
        for ax in fig.axes[4:6]:
            assert [ln.get_label() for ln in ax.get_lines()] == [LABELS["hit"]]
        legend = {t.get_text() for t in fig.legends[0].get_texts()}
        assert {LABELS[k] for k in ("live", "paused", "queued", "window", "open")} <= legend
        assert LABELS["no control"] in legend
    finally:
        plt.close(fig)


def test_the_picture_says_when_the_law_started_open_and_closed_in() -> None:
    import matplotlib.pyplot as plt

    samples = [
        _c(0, None, 6, decision="open"),
        _c(4, None, 6, decision="open"),
        _c(5, 3, 3, paused=3, decision="decrease:pressure"),
        _c(9, 3, 0),
    ]
    fig = figure(direct(), controlled(samples), "title")
    try:
        concur = fig.axes[1]
        texts = [t.get_text() for t in concur.texts]
        assert any("open from the start; closed in at 5 s" in t for t in texts), texts
        assert not any("admitted at once" in t for t in texts)
        (span,) = [p for p in concur.patches if p.get_label() == LABELS["open"]]
        assert (span.get_x(), span.get_width()) == (0, 5)
    finally:
        plt.close(fig)
