"""The demo's report: a side-by-side table, ``demo.json`` and a PNG over time.

Figures come from two places: the swarm client (makespan, throughput, agent
times: what the agents experienced) and the engine's own counters at the end of
each run (prefix-cache hits and queries, preemptions, prompt tokens computed:
what the engine did). Recomputed tokens are the prompt tokens the engine
computed beyond what a perfect, unbounded prefix cache would have needed for the
same requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concur.sim.demo.monitor import Sample
from concur.sim.trace import Trace, summarize

__all__ = [
    "RunRecord",
    "comparison_rows",
    "ideal_prefill_tokens",
    "print_table",
    "write_json",
]

# Counter names on concur engine's /metrics (vLLM's, plus the engine's own extras).
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
PREEMPTIONS = "vllm:num_preemptions_total"
PROMPT = "vllm:prompt_tokens_total"

# Chat template tokens (concur.sim.server.prompt): <role> content <end> per message, and
# the prompt ends with <assistant>. What a step adds beyond its new input:
STEP0_TEMPLATE = 3  # <user> ... <end> <assistant> (a system prompt's 2 are shared)
STEP_TEMPLATE = 4  # <end> after the previous output, <user> ... <end> <assistant>


@dataclass
class RunRecord:
    """One live run: who drove it, what the swarm saw, what the engine counted."""

    label: str
    swarm: dict[str, Any]
    """:meth:`SwarmSummary.to_dict`."""
    engine: dict[str, float]
    """The engine's counters at the end (:func:`~concur.sim.demo.monitor.engine_counters`)."""
    samples: list[Sample] = field(default_factory=list)
    ideal_prefill_tokens: int = 0
    """Prompt tokens a perfect prefix cache computes for the trace (template included)."""
    proxy_status: dict[str, Any] | None = None
    """concur's ``/concur/status`` after the run (controlled run only)."""
    agents: list[dict[str, Any]] = field(default_factory=list)
    """Per-agent results (:meth:`AgentResult.to_dict`)."""
    simulated: bool = True
    """On a simulated engine's clock (``concur engine``), or a real engine's (vLLM)."""

    @property
    def unit(self) -> str:
        """How its times read: simulated seconds, or plain seconds on a real engine."""
        return "simulated s" if self.simulated else "s"

    @property
    def hit_rate(self) -> float | None:
        q = self.engine.get(QUERIES)
        return self.engine.get(HITS, 0.0) / q if q else None

    @property
    def preemptions(self) -> int:
        return int(self.engine.get(PREEMPTIONS, 0))

    @property
    def computed_prompt_tokens(self) -> int:
        """Prompt tokens the engine computed: prompt tokens minus prefix-cache hits."""
        return int(self.engine.get(PROMPT, 0.0) - self.engine.get(HITS, 0.0))

    @property
    def recomputed_tokens(self) -> int:
        """Computed prompt tokens beyond what a perfect prefix cache computes."""
        return max(0, self.computed_prompt_tokens - self.ideal_prefill_tokens)

    def figures(self) -> dict[str, Any]:
        s = self.swarm
        return {
            "label": self.label,
            "makespan_s": s["makespan_s"],
            "makespan_wall_s": s["makespan_wall_s"],
            "output_tok_per_s": s["output_tok_per_s"],
            "hit_rate": None if self.hit_rate is None else round(self.hit_rate, 4),
            "preemptions": self.preemptions,
            "computed_prompt_tokens": self.computed_prompt_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "mean_completion_s": s["mean_completion_s"],
            "finished_agents": s["finished_agents"],
            "agents": s["agents"],
            "errors": s["errors"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "figures": self.figures(),
            "swarm": self.swarm,
            "engine": self.engine,
            "samples": [x.to_dict() for x in self.samples],
            "proxy_status": self.proxy_status,
            "agents": self.agents,
        }


def ideal_prefill_tokens(trace: Trace) -> int:
    """Prompt tokens a perfect, unbounded prefix cache computes for ``trace`` as the
    swarm sends it: each new input once, each shared system prompt once, plus the
    chat template's tokens (block rounding ignored)."""
    prefixes = {a.shared_prefix.id for a in trace.agents if a.shared_prefix is not None}
    template = sum(STEP0_TEMPLATE + STEP_TEMPLATE * (len(a.steps) - 1) for a in trace.agents)
    return summarize(trace).prefill_tokens_ideal + template + 2 * len(prefixes)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ratio(a: float | None, b: float | None, *, higher_is_better: bool) -> str:
    if not a or not b:
        return "-"
    r = b / a if higher_is_better else a / b
    return f"{r:.2f}x"


def comparison_rows(direct: RunRecord, controlled: RunRecord) -> list[tuple[str, str, str, str]]:
    """``(figure, without control, with concur, concur's gain)`` rows."""
    d, c = direct.figures(), controlled.figures()
    return [
        (
            f"makespan ({direct.unit})",
            f"{d['makespan_s']:,.1f}",
            f"{c['makespan_s']:,.1f}",
            _ratio(d["makespan_s"], c["makespan_s"], higher_is_better=False),
        ),
        (
            "wall time (s)",
            f"{d['makespan_wall_s']:,.1f}",
            f"{c['makespan_wall_s']:,.1f}",
            "",
        ),
        (
            "throughput (output tok/s)",
            f"{d['output_tok_per_s']:,.0f}",
            f"{c['output_tok_per_s']:,.0f}",
            _ratio(d["output_tok_per_s"], c["output_tok_per_s"], higher_is_better=True),
        ),
        ("prefix-cache hit rate", _pct(d["hit_rate"]), _pct(c["hit_rate"]), ""),
        ("preemptions", f"{d['preemptions']:,}", f"{c['preemptions']:,}", ""),
        (
            "recomputed prompt tokens",
            f"{d['recomputed_tokens']:,}",
            f"{c['recomputed_tokens']:,}",
            _ratio(d["recomputed_tokens"], c["recomputed_tokens"], higher_is_better=False),
        ),
        (
            f"mean agent time ({direct.unit})",
            f"{d['mean_completion_s']:,.1f}",
            f"{c['mean_completion_s']:,.1f}",
            "",
        ),
        (
            "agents finished",
            f"{d['finished_agents']}/{d['agents']}",
            f"{c['finished_agents']}/{c['agents']}",
            "",
        ),
    ]


def print_table(direct: RunRecord, controlled: RunRecord, title: str) -> None:
    """The comparison as a rich table on stdout (wide enough not to wrap in logs)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column(direct.label, justify="right")
    table.add_column(controlled.label, justify="right")
    table.add_column("concur", justify="right")
    for row in comparison_rows(direct, controlled):
        table.add_row(*row)
    probe = Console()
    console = probe if probe.is_terminal else Console(width=100)
    console.print(table)


def write_json(path: Path, meta: dict[str, Any], runs: Sequence[RunRecord]) -> None:
    data = {"meta": meta, "runs": {r.label: r.to_dict() for r in runs}}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
