"""The demo's picture (``demo.png``): both runs side by side on one time scale.

Two columns, no control on the left and concur on the right, sharing the time axis
(the shorter run ends earlier) and each row's scale. Top row: the agents, stacked
(live, paused at a step boundary, queued before their first request) under the window;
spans without a limit are shaded (no control at all, or concur's engine-aware law
open) and the window line breaks there. Then the engine's KV cache usage and its
prefix-cache hit rate between two readings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from concur.sim.demo.report import RunRecord
from concur.sim.demo.story import (
    NO_CONTROL,
    OPEN,
    Timeline,
    start_jump,
    start_open_span,
    timeline,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LABELS", "figure", "write_plot"]

LABELS = {
    "live": "live agents (running or in a tool call)",
    "paused": "paused at a step boundary",
    "queued": "queued before their first request",
    "window": "window (most live agents allowed)",
    NO_CONTROL: "no limit: no admission control",
    OPEN: "open: concur set no limit (from the start, or the engine idle)",
    "no limit": "no limit",
    "kv": "KV cache usage",
    "hit": "prefix-cache hit rate",
}
COLORS = {
    "live": "#2ca02c",
    "paused": "#ff7f0e",
    "queued": "#9467bd",
    "window": "black",
    NO_CONTROL: "#d62728",
    OPEN: "#e6b800",
    "no limit": "#7f7f7f",
    "kv": "#1f77b4",
    "hit": "#8c564b",
}


def _nan(values: Sequence[float | int | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _agents(ax: Axes, tl: Timeline, initial: int | None) -> None:
    t = tl.t
    live = [float(x) for x in tl.live]
    paused = [a + b for a, b in zip(live, tl.paused, strict=True)]
    queued = [a + b for a, b in zip(paused, tl.queued, strict=True)]
    for lo, hi, key in ((None, live, "live"), (live, paused, "paused"), (paused, queued, "queued")):
        ax.fill_between(
            t,
            [0.0] * len(t) if lo is None else lo,
            hi,
            step="post",
            color=COLORS[key],
            alpha=0.55,
            lw=0,
            label=LABELS[key],
        )
    for start, end, why in tl.no_limit:
        ax.axvspan(start, end, color=COLORS[why], alpha=0.12, lw=0, label=LABELS[why])
    if tl.controlled:
        ax.step(
            t, _nan(tl.window), where="post", color=COLORS["window"], lw=1.6, label=LABELS["window"]
        )
    else:
        ax.text(
            0.5,
            0.96,
            "no window: every agent that has arrived runs",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=9,
        )
    opened = start_open_span(tl) if tl.controlled else None
    if opened is not None:  # the law started open: say so, and where it closed in
        closed = opened[1] < tl.end
        i = tl.t.index(opened[1]) if closed and opened[1] in tl.t else None
        text = (
            f"open from the start; closed in at {opened[1]:,.0f} s:\n"
            "the agents waited on the engine (pauses at step boundaries)"
            if closed
            else "open from the start to the end:\nthe agents never waited on the engine for long"
        )
        xy = (opened[1], tl.window[i] or 0) if i is not None else (opened[0], 0)
        _note(ax, text, xy)
        return
    jump = start_jump(tl, initial) if initial is not None else None
    if jump is not None:
        at, window, live_now = jump
        _note(
            ax,
            f"window {initial} → {window}: {live_now} agents admitted at once\n"
            "(their first contexts fit the cache; paused later as they grow)",
            (at, window),
        )


def _note(ax: Axes, text: str, xy: tuple[float, float]) -> None:
    """What the law did at the start, in the top right corner, pointing at ``xy``."""
    ax.annotate(
        text,
        xy=xy,
        xytext=(0.98, 0.96),
        textcoords="axes fraction",
        ha="right",
        va="top",
        fontsize=8,
        arrowprops={"arrowstyle": "->", "lw": 0.8},
    )


def _series(ax: Axes, run: RunRecord, key: str) -> None:
    attr = "kv_usage" if key == "kv" else "hit_rate"
    pts = [(s.t, getattr(s, attr)) for s in run.samples if getattr(s, attr) is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[key], lw=1.4, label=LABELS[key])
    ax.set_ylim(0, 1.05)


def _title(run: RunRecord) -> str:
    f = run.figures()
    hit = "-" if f["hit_rate"] is None else f"{100 * f['hit_rate']:.0f}%"
    return f"{run.label}: makespan {f['makespan_s']:,.0f} s, hit rate {hit}"


def figure(direct: RunRecord, controlled: RunRecord, title: str) -> Figure:
    """The picture as a matplotlib figure (rows: agents, KV usage, hit rate; columns: runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        3, 2, figsize=(13, 8.5), sharex=True, sharey="row", height_ratios=(2.2, 1, 1)
    )
    policy: dict[str, Any] = (controlled.proxy_status or {}).get("policy") or {}
    initial = policy.get("initial_window")
    for col, run in enumerate((direct, controlled)):
        tl = timeline(run)
        _agents(axes[0][col], tl, initial if isinstance(initial, int) and col else None)
        _series(axes[1][col], run, "kv")
        _series(axes[2][col], run, "hit")
        axes[0][col].set_title(_title(run), fontsize=11)
        axes[2][col].set_xlabel("simulated seconds" if run.simulated else "seconds")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("agents")
    axes[0][0].set_ylim(bottom=0)
    axes[1][0].set_ylabel(LABELS["kv"])
    axes[2][0].set_ylabel(LABELS["hit"])
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncols=4, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def write_plot(path: Path, direct: RunRecord, controlled: RunRecord, title: str) -> bool:
    """Write the picture to ``path``; False (and nothing written) without matplotlib."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    fig = figure(direct, controlled, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
