"""What each half of the demo did, from its own data: agents over time and the closing text.

:func:`timeline` turns one run's readings into the series the plot draws: live,
paused and queued agents and the window (``None`` where there was no limit, with the
spans of no limit and why: no control at all, or concur's engine-aware law open).
Without concur every agent that has arrived and not ended is live, as the swarm's own
per-agent times say. :func:`story` tells what concur did in plain words (how far the
window opened at the start and why, or that it started open and when and why it closed;
how many agents it held back and how, how long it was open) and what that bought, with
every number taken from the runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from concur.sim.demo.monitor import Sample
from concur.sim.demo.report import RunRecord

__all__ = ["Held", "Timeline", "held_back", "start_jump", "start_open_span", "story", "timeline"]

NO_CONTROL = "no control"
OPEN = "open"
NO_LIMIT = "no limit"


@dataclass
class Timeline:
    """One run's agents and window over simulated time (one entry per reading)."""

    t: list[float] = field(default_factory=list)
    window: list[int | None] = field(default_factory=list)
    """``None``: no limit at that reading."""
    live: list[int] = field(default_factory=list)
    paused: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    no_limit: list[tuple[float, float, str]] = field(default_factory=list)
    """``(start, end, why)`` spans without a limit; why is ``no control``, ``open`` (the
    engine-aware law lifted its limit) or ``no limit`` (any other policy without one)."""
    controlled: bool = False

    @property
    def end(self) -> float:
        return self.t[-1] if self.t else 0.0


def _running(agents: Sequence[dict[str, Any]], t: float) -> int:
    """Agents that have arrived by ``t`` and not ended (the swarm's own times)."""
    count = 0
    for a in agents:
        end = a.get("end_s")
        if a.get("arrival_s", 0.0) <= t and (end is None or t < end):
            count += 1
    return count


def timeline(run: RunRecord) -> Timeline:
    """The run's agents and window; a run without concur (no status readings) has every
    arrived agent live and no limit throughout."""
    samples = run.samples
    tl = Timeline(controlled=any(s.live is not None for s in samples))
    if not tl.controlled:
        ends = [a["end_s"] for a in run.agents if a.get("end_s") is not None]
        times = sorted({0.0, *(s.t for s in samples), *(float(e) for e in ends)})
        for t in times:
            tl.t.append(t)
            tl.window.append(None)
            tl.live.append(_running(run.agents, t))
            tl.paused.append(0)
            tl.queued.append(0)
        if times:
            tl.no_limit.append((times[0], times[-1], NO_CONTROL))
        return tl
    for s in samples:
        tl.t.append(s.t)
        tl.window.append(s.window)
        tl.live.append(s.live or 0)
        tl.paused.append(s.paused or 0)
        tl.queued.append(s.queued or 0)
    tl.no_limit = _spans(samples)
    return tl


def _spans(samples: Sequence[Sample]) -> list[tuple[float, float, str]]:
    """Runs of readings with no window, each lasting until the next reading."""
    spans: list[tuple[float, float, str]] = []
    start: float | None = None
    why = NO_LIMIT
    for i, s in enumerate(samples):
        if s.window is None and s.live is not None:
            if start is None:
                start, why = s.t, OPEN if s.decision == OPEN else NO_LIMIT
            end = samples[i + 1].t if i + 1 < len(samples) else s.t
            if spans and spans[-1][0] == start:
                spans[-1] = (start, end, why)
            else:
                spans.append((start, end, why))
        else:
            start = None
    return spans


@dataclass(frozen=True)
class Held:
    most: int
    paused: int
    queued: int
    open_s: float


def held_back(tl: Timeline) -> Held:
    """The most agents held back at once, the most paused and queued, seconds open."""
    pairs = list(zip(tl.paused, tl.queued, strict=True))
    return Held(
        most=max((p + q for p, q in pairs), default=0),
        paused=max(tl.paused, default=0),
        queued=max(tl.queued, default=0),
        open_s=sum(b - a for a, b, why in tl.no_limit if why == OPEN),
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _outcome(direct: RunRecord, controlled: RunRecord) -> str:
    d, c = direct.figures(), controlled.figures()
    who = controlled.label
    if not (d["makespan_s"] and c["makespan_s"]):
        return f"{who} did not finish a comparable run."
    gain = d["makespan_s"] / c["makespan_s"]
    times = f"{c['makespan_s']:,.0f} vs {d['makespan_s']:,.0f} {direct.unit}"
    speed = (
        f"{who} finished the swarm {gain:.2f}x faster than no control ({times})"
        if gain >= 1.0
        else f"{who} was {1 / gain:.2f}x slower than no control on this run ({times})"
    )
    hits = f", prefix-cache hit rate {_pct(c['hit_rate'])} vs {_pct(d['hit_rate'])}"
    rec_d, rec_c = d["recomputed_tokens"], c["recomputed_tokens"]
    recomputed = (
        f", {rec_d / rec_c:.1f}x fewer prompt tokens recomputed" if rec_c and rec_d > rec_c else ""
    )
    return speed + hits + recomputed + "."


def start_jump(tl: Timeline, initial: int) -> tuple[float, int, int] | None:
    """The first reading with the window and the live agents above the initial window:
    ``(t, window, live)``, or ``None`` when the window never opened past it."""
    for t, w, live in zip(tl.t, tl.window, tl.live, strict=True):
        if w is not None and w > initial and live > initial:
            return t, w, live
    return None


def start_open_span(tl: Timeline) -> tuple[float, float] | None:
    """The span the engine-aware law was open from its first reading, if it started so."""
    if tl.t and tl.no_limit and tl.no_limit[0][0] == tl.t[0] and tl.no_limit[0][2] == OPEN:
        return tl.no_limit[0][0], tl.no_limit[0][1]
    return None


def _started_open(tl: Timeline, span: tuple[float, float], policy: dict[str, Any]) -> str:
    text = (
        "It started open (no limit, nobody held back, shaded in the plot): nothing said "
        "yet that the engine was the bottleneck, and an agent held back at the start is "
        "late for its whole life"
    )
    if span[1] >= tl.end:
        return text + (
            ". It stayed open: the agents never waited on the engine for most of a cycle "
            "while the cache was congested, so holding them back would only have idled it."
        )
    share = policy.get("share_high")
    mark = f"{100 * share:.0f}%" if isinstance(share, float) else "most"
    return text + (
        f". At {span[1]:,.0f} s it closed in: the cache was congested and the agents had "
        f"spent more than {mark} of their cycle waiting on the engine for a whole cycle, so "
        "the engine was the bottleneck and every recomputed prefix cost useful work."
    )


def _start(
    tl: Timeline, policy: dict[str, Any], agents: int, opened: tuple[float, float] | None
) -> str | None:
    """How the law started: open (``opened``, its first span), or how far the window
    opened and why."""
    if opened is not None:
        return _started_open(tl, opened, policy)
    initial = policy.get("initial_window")
    jump = start_jump(tl, initial) if isinstance(initial, int) else None
    if jump is None:
        return None
    t, w, live = jump
    why = ""
    if policy.get("name") == "aimd" and policy.get("increase") == "fit":
        low = policy.get("low")
        mark = f"{100 * low:.0f}% of" if isinstance(low, float) else "its low mark in"
        why = (
            f": by design, aimd admits at once every waiting agent whose current context "
            f"fits under {mark} the KV cache, and pauses agents at step boundaries later, "
            "as their contexts grow"
        )
    who = f"all {live}" if live == agents else f"{live}"
    return (
        f"At the start it let {who} agents run at once within {t:.0f} s "
        f"(window {initial} → {w}){why}."
    )


def _held(held: Held, agents: int) -> str:
    if held.most == 0:
        return (
            "It never held an agent back: the agents' working set stayed within what the "
            "cache holds."
        )
    how: list[str] = []
    if held.paused:
        how.append(f"up to {held.paused} paused at step boundaries")
    if held.queued:
        how.append(f"up to {held.queued} queued before their first request")
    if not held.paused:
        how.append("none paused")
    if not held.queued:
        how.append("none queued")
    return f"It held up to {held.most} of {agents} agents back at once ({', '.join(how)})."


def story(direct: RunRecord, controlled: RunRecord) -> str:
    """The demo's closing text: what concur did and what it bought, from the runs."""
    tl = timeline(controlled)
    held = held_back(tl)
    policy = (controlled.proxy_status or {}).get("policy") or {}
    agents = int(controlled.swarm.get("agents", 0)) or max(tl.live, default=0)
    parts = [_outcome(direct, controlled)]
    first = start_open_span(tl)
    start = _start(tl, policy, agents, first)
    if start:
        parts.append(start)
    if held.most or first is None:  # (open throughout: the start's text said it all)
        parts.append(_held(held, agents))
    reopened = held.open_s - (first[1] - first[0] if first else 0.0)
    if reopened > 0:
        again = " again" if first else ""
        parts.append(
            f"For {reopened:,.0f} s it was open{again} (no limit, nobody paused; shaded in "
            "the plot): the engine sat idle while agents were held back, and cache misses "
            "cost less than an idle engine."
        )
    d_hit, c_hit = direct.hit_rate, controlled.hit_rate
    if held.most and d_hit is not None and c_hit is not None and c_hit > d_hit:
        parts.append("So the live agents' prefixes stayed in the cache between tool calls.")
    return " ".join(parts)
