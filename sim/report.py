"""Reports of simulator runs: ``summary.json``, ``summary.md``, a terminal table, plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from concur.sim.runner import RunResult, Summary
from concur.sim.trace import Trace

TERMINAL_COLUMNS = (
    "policy",
    "makespan_s",
    "speedup",
    "output_tok_per_s",
    "prefix_hit_rate",
    "preemptions",
    "recompute_share",
    "mean_queue_wait_s",
    "finished_agents",
)
"""The columns that fit an 80-column terminal; the markdown report has them all."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("policy", "policy"),
    ("makespan_s", "makespan s"),
    ("speedup", "speedup"),
    ("output_tok_per_s", "tok/s"),
    ("prefix_hit_rate", "hits"),
    ("preemptions", "preempt"),
    ("recomputed_tokens", "recomputed tok"),
    ("recompute_share", "recomp"),
    ("mean_completion_s", "mean agent s"),
    ("p99_completion_s", "p99 agent s"),
    ("mean_queue_wait_s", "wait s"),
    ("finished_agents", "done"),
)


def baseline(summaries: Sequence[Summary]) -> Summary | None:
    return next((s for s in summaries if s.policy == "unlimited"), None)


def rows(summaries: Sequence[Summary]) -> list[dict[str, str]]:
    """Formatted table rows, with each policy's speedup over ``unlimited``."""
    base = baseline(summaries)
    out: list[dict[str, str]] = []
    for s in summaries:
        d = s.to_dict()
        speed = (base.makespan_s / s.makespan_s) if base and s.makespan_s else None
        cells = {
            "policy": s.policy,
            "makespan_s": f"{s.makespan_s:,.1f}",
            "speedup": f"{speed:.2f}x" if speed else "-",
            "output_tok_per_s": f"{s.output_tok_per_s:,.0f}",
            "prefix_hit_rate": f"{100 * s.prefix_hit_rate:.1f}%",
            "preemptions": f"{s.preemptions:,}",
            "recomputed_tokens": f"{s.recomputed_tokens:,}",
            "recompute_share": f"{100 * s.recompute_share:.1f}%",
            "mean_completion_s": f"{s.mean_completion_s:,.1f}",
            "p99_completion_s": f"{s.p99_completion_s:,.1f}",
            "mean_queue_wait_s": f"{s.mean_queue_wait_s:,.1f}",
            "finished_agents": f"{d['finished_agents']}/{d['agents']}",
        }
        out.append(cells)
    return out


def markdown_table(summaries: Sequence[Summary]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join(" --- " for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(r[k] for k, _ in COLUMNS) + " |" for r in rows(summaries)]
    return "\n".join([head, sep, *body])


def explain(summaries: Sequence[Summary]) -> str:
    """A plain-language account of who won and why, from the figures alone."""
    finished = [s for s in summaries if s.finished_agents == s.agents] or list(summaries)
    if not finished:
        return "No runs."
    best = min(finished, key=lambda s: s.makespan_s)
    base = baseline(summaries)
    lines = [f"**{best.policy}** finished first ({best.makespan_s:,.1f} s)."]
    if base is not None and base is not best and best.makespan_s > 0:
        lines.append(
            f"It was {base.makespan_s / best.makespan_s:.2f}x faster than no control "
            f"(`unlimited`, {base.makespan_s:,.1f} s). "
            f"Without control the prefix-cache hit rate was {100 * base.prefix_hit_rate:.0f}% "
            f"and {100 * base.recompute_share:.0f}% of all prefill recomputed context that had "
            f"been computed before ({base.recomputed_tokens:,} tokens, "
            f"{base.preemptions:,} preemptions); with {best.policy} the hit rate was "
            f"{100 * best.prefix_hit_rate:.0f}% and the recompute share "
            f"{100 * best.recompute_share:.0f}% ({best.recomputed_tokens:,} tokens)."
        )
        if base.recompute_share > best.recompute_share + 0.05:
            lines.append(
                "The difference is thrashing: with every agent live, the prefixes of agents "
                "waiting on tool calls are evicted, so each returning agent prefills its whole "
                "context again and evicts others in turn. Bounding the live agents keeps their "
                "prefixes resident, and the engine spends its time on new tokens."
            )
    return " ".join(lines)


def write_json(results: Sequence[RunResult], path: Path, meta: dict[str, Any]) -> None:
    payload = {
        "meta": meta,
        "policies": [
            {"summary": r.summary.to_dict(), "params": _jsonable(r.describe)} for r in results
        ],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_markdown(
    results: Sequence[RunResult], path: Path, meta: dict[str, Any], trace: Trace | None = None
) -> None:
    """The table, who won and why, and what each policy held back and what to look at
    (with a ``--kv-tokens`` hint when the cache never filled: ``meta["kv_capacity_tokens"]``)."""
    from concur.sim.guide import closing_text

    summaries = [r.summary for r in results]
    capacity = meta.get("kv_capacity_tokens")
    lines = [
        f"# concur sim: {meta.get('trace', 'trace')}",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "trace"),
        "",
        markdown_table(summaries),
        "",
        explain(summaries),
        "",
        closing_text(results, capacity if isinstance(capacity, int) else None, trace),
        "",
    ]
    path.write_text("\n".join(lines))


def plot(results: Sequence[RunResult], out_dir: Path) -> list[Path]:
    """Time series (KV usage, hit rate, window and live agents) and a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    longest = max((r.samples[-1].t for r in results if r.samples), default=1.0)
    span = max(5.0, longest / 100)
    for r in results:
        s = r.samples
        t = [x.t for x in s]
        label = r.summary.policy
        (line,) = axes[0].plot(t, [_nan(x.kv_usage) for x in s], label=label, lw=1.2)
        color = line.get_color()
        axes[0].plot(t, [_nan(x.working_set) for x in s], color=color, lw=0.8, ls=":")
        axes[1].plot(t, smoothed_hit_rate(s, span), label=label, lw=1.2, color=color)
        axes[2].plot(t, [x.live for x in s], label=label, lw=1.2, color=color)
        # No limit (unlimited, or an engine-aware law open) is drawn at the top: every agent.
        top = r.summary.agents
        axes[2].plot(
            t, [top if x.window is None else x.window for x in s], lw=0.8, ls="--", color=color
        )
        axes[3].plot(t, [x.queued + x.paused for x in s], label=label, lw=1.2, color=color)
    axes[0].set_ylabel("engine KV usage\n(dotted: working set)")
    axes[0].axhline(0.85, color="grey", lw=0.6, ls="--")
    axes[1].set_ylabel(f"prefix hit rate\n(trailing {span:.0f} s)")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_ylabel("live agents\n(dashed: window; at the\ntop: no limit)")
    axes[3].set_ylabel("queued + paused agents")
    axes[3].set_xlabel("time (s)")
    axes[0].legend(loc="upper right", fontsize=8, ncols=3)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    ts = out_dir / "timeseries.png"
    fig.savefig(ts, dpi=110)
    plt.close(fig)
    paths.append(ts)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.summary.policy for r in results]
    ax1.bar(names, [r.summary.makespan_s for r in results], color="tab:blue")
    ax1.set_ylabel("makespan (s), lower is better")
    ax2.bar(names, [r.summary.output_tok_per_s for r in results], color="tab:green")
    ax2.set_ylabel("output tokens/s, higher is better")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    bars = out_dir / "makespan_throughput.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    paths.append(bars)
    return paths


def smoothed_hit_rate(samples: Sequence[Any], span_s: float) -> list[float]:
    """Hit rate over a trailing window of ``span_s`` seconds, from the engine's counters."""
    out: list[float] = []
    j = 0
    for i, s in enumerate(samples):
        while samples[j].t < s.t - span_s and j < i:
            j += 1
        a, b = samples[j], s
        if None in (a.hits_total, a.queries_total, b.hits_total, b.queries_total):
            out.append(float("nan"))
            continue
        dq = b.queries_total - a.queries_total
        out.append((b.hits_total - a.hits_total) / dq if dq > 0 else float("nan"))
    return out


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def write_all(
    results: Sequence[RunResult], out_dir: Path, meta: dict[str, Any], trace: Trace | None = None
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "summary.json", meta)
    write_markdown(results, out_dir / "summary.md", meta, trace)
    return [out_dir / "summary.json", out_dir / "summary.md", *plot(results, out_dir)]
