"""Choose concur's defaults by measurement: sweep policies and AIMD settings over traces.

    .venv/bin/python bench/tune_defaults.py [--traces swe-swarm,chat,...] [--jobs 2]
        [--out out/tune] [--quick]

Traces: swe-swarm, swe-swarm-staggered, tracelab, chat (Qwen3-32B on 2 x H100, roofline),
and the three regimes of bench/real_engine.py, tool-bound, engine-bound and staggered, on
the ``cpu-tiny`` preset (the real engine's measured costs) with vLLM's priority scheduler,
seed 0, as the benchmark runs them.

For each trace it runs ``unlimited``, a sweep of fixed caps (the best one found
in hindsight is the bar to meet), the shipped policies and presets, and one-
parameter variations of the default AIMD. It prints, per trace, each run's
makespan relative to ``unlimited`` and to the best static cap, and at the end
the worst ratio to the best cap of each variant across all traces: the number a
default must keep low, because users will not re-tune per trace.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concur.policies.registry import PolicySettings
from concur.sim.batch import Job, run_jobs
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.importers import import_trace
from concur.sim.runner import RunOptions, RunResult
from concur.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


@dataclass(frozen=True)
class Variant:
    label: str
    spec: str
    aimd: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    interval: float = 1.0


VARIANTS: tuple[Variant, ...] = (
    Variant("aimd (default)", "aimd"),
    Variant("aimd:cache (working set kept resident, not engine-aware)", "aimd:cache"),
    Variant("aimd start resident", "aimd", {"start_open": False}),
    Variant("aimd share_high .7", "aimd", {"share_high": 0.7}),
    Variant("aimd share_high .8", "aimd", {"share_high": 0.8}),
    Variant("aimd high .90 low .80", "aimd", {"high": 0.9, "low": 0.8}),
    Variant("aimd high .95 low .85", "aimd", {"high": 0.95, "low": 0.85}),
    Variant("aimd additive increase", "aimd", {"increase": "additive"}),
    Variant("aimd alpha 2", "aimd", {"alpha": 2}),
    Variant("aimd beta .7", "aimd", {"beta": 0.7}),
    Variant("aimd cooldown 2", "aimd", {"decrease_cooldown": 2.0}),
    Variant("aimd interval 2", "aimd", interval=2.0),
    Variant("aimd working_set only", "aimd", {"pressure": "working_set"}),
    Variant("aimd kv+projected+pause", "aimd", {"pressure": "kv,projected"}),
    Variant("aimd:kv", "aimd:kv"),
    Variant("aimd:admission", "aimd:admission"),
    Variant("aimd:projected", "aimd:projected"),
    Variant("aimd:paper", "aimd:paper"),
    Variant("fit", "fit"),
    Variant("epp", "epp"),
)
QUICK = (
    "aimd (default)",
    "aimd start resident",
    "aimd share_high .7",
    "aimd share_high .8",
    "aimd:cache (working set kept resident, not engine-aware)",
    "aimd:kv",
    "aimd:paper",
    "fit",
    "epp",
)
ALL_TRACES = "swe-swarm,swe-swarm-staggered,tracelab,chat,tool-bound,engine-bound,staggered"
REAL_REGIMES = ("tool-bound", "engine-bound", "staggered")


@dataclass(frozen=True)
class Case:
    name: str
    trace: Trace
    statics: tuple[int, ...]
    engine: EngineSpec = field(default_factory=EngineSpec)


def cases(names: list[str]) -> list[Case]:
    out: list[Case] = []
    for name in names:
        if name in ("swe-swarm", "swe-swarm-staggered"):
            out.append(Case(name, generate(name, 0), (4, 6, 8, 10)))
        elif name == "tracelab":
            trace = import_trace("tracelab-csv", SHARED / "tracelab_multi_session_large.csv")
            out.append(Case("tracelab-csv", trace, (8, 16, 24, 32, 48)))
        elif name == "chat":
            out.append(Case("chat", generate("chat", 0), (16, 32, 64, 128)))
        elif name in REAL_REGIMES:
            # The engine as bench/real_engine.py runs it: vLLM's priority scheduler.
            engine = EngineSpec.from_preset("cpu-tiny", scheduling_policy="priority")
            out.append(Case(f"{name} (cpu-tiny)", generate(name, 0), (2, 4, 6, 8, 12), engine))
        else:
            raise SystemExit(f"unknown trace {name!r}; choose from {ALL_TRACES}")
    return out


def jobs_for(case: Case, variants: tuple[Variant, ...]) -> list[Job]:
    jobs = [Job("unlimited", "unlimited", case.trace, case.engine)]
    jobs += [Job(f"static:{n}", f"static:{n}", case.trace, case.engine) for n in case.statics]
    for v in variants:
        settings = PolicySettings.model_validate({"aimd": v.aimd, "fit": v.fit})
        jobs.append(
            Job(
                v.label,
                v.spec,
                case.trace,
                case.engine,
                settings,
                RunOptions(control_interval=v.interval),
            )
        )
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=ALL_TRACES, help=f"comma-separated (default {ALL_TRACES})")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("out/tune"))
    ap.add_argument("--quick", action="store_true", help="only the shipped policies")
    args = ap.parse_args()
    variants = tuple(v for v in VARIANTS if not args.quick or v.label in QUICK)
    args.out.mkdir(parents=True, exist_ok=True)
    worst: dict[str, float] = {}
    speedups: dict[str, list[float]] = {}
    everything: dict[str, Any] = {}
    for case in cases(args.traces.split(",")):
        t0 = time.monotonic()
        results: list[RunResult] = run_jobs(jobs_for(case, variants), workers=args.jobs)
        by = {r.summary.policy: r.summary for r in results}
        base = by["unlimited"].makespan_s
        statics = {k: v for k, v in by.items() if k.startswith("static:")}
        best_label, best = min(statics.items(), key=lambda kv: kv[1].makespan_s)
        print(
            f"\n## {case.name}: {len(case.trace.agents)} agents, {case.engine.describe()} "
            f"({time.monotonic() - t0:.0f} s wall)\n"
        )
        print(f"best static cap in hindsight: {best_label} ({best.makespan_s:,.0f} s)\n")
        print("| policy | makespan s | vs unlimited | vs best static | hit rate | recompute |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, s in by.items():
            rel = s.makespan_s / best.makespan_s
            print(
                f"| {label} | {s.makespan_s:,.0f} | {base / s.makespan_s:.2f}x | {rel:.2f} | "
                f"{100 * s.prefix_hit_rate:.0f}% | {100 * s.recompute_share:.0f}% |"
            )
            if not label.startswith("static:") and label != "unlimited":
                worst[label] = max(worst.get(label, 0.0), rel)
                speedups.setdefault(label, []).append(base / s.makespan_s)
        everything[case.name] = {k: v.to_dict() for k, v in by.items()}
    print("\n## Across traces: worst makespan relative to the best static cap (lower is better)\n")
    print("| policy | worst vs best static | speedup over unlimited (range) |")
    print("| --- | --- | --- |")
    for label, rel in sorted(worst.items(), key=lambda kv: kv[1]):
        sp = speedups[label]
        print(f"| {label} | {rel:.2f} | {min(sp):.2f}-{max(sp):.2f}x |")
    (args.out / "tune.json").write_text(json.dumps(everything, indent=1) + "\n")
    print(f"\nall figures: {args.out / 'tune.json'}")


if __name__ == "__main__":
    main()
