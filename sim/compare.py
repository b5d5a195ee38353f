"""Hold the built-in engine model to vLLM's own scheduler: ``concur sim compare-engines``.

The same trace runs under each policy through both engines (the built-in
:class:`~concur.sim.engine.EngineModel` and :class:`~concur.sim.vllm_engine.VllmEngine`,
which drives vLLM's real V1 scheduler), with the same runner, admission gate, policy
code and roofline step time. Per policy the report puts makespan, prefix hit rate,
recompute share and preemptions side by side, the ratio of the two makespans
(built-in / vLLM) and the wall and CPU time of each engine's run, and says whether both
engines rank the policies the same (by makespan).

Runs go to worker processes (one job per engine and policy); a worker imports vLLM
once, before its first job, so wall times are those of the runs alone (engine
construction included, vLLM's import excluded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concur.sim.batch import Job, run_job
from concur.sim.engine_config import EngineSpec
from concur.sim.runner import RunOptions, Summary
from concur.sim.trace import Trace

__all__ = [
    "ENGINES",
    "EngineRun",
    "PolicyComparison",
    "TraceComparison",
    "compare_engines",
    "markdown",
    "register_compare",
    "run_timed",
]

ENGINES = ("builtin", "vllm")
DEFAULT_TOLERANCE = 0.15
"""The target: the built-in makespan within 15% of vLLM's."""


@dataclass(frozen=True, slots=True)
class EngineRun:
    """One policy run on one engine, with its wall time."""

    engine: str
    summary: Summary
    wall_s: float
    cpu_s: float
    """CPU seconds of the worker process: unlike wall time, not inflated when other
    processes share the cores."""


@dataclass(frozen=True, slots=True)
class PolicyComparison:
    """One policy through both engines."""

    policy: str
    builtin: EngineRun
    vllm: EngineRun

    @property
    def makespan_ratio(self) -> float:
        """Built-in makespan / vLLM makespan (1.0 = identical)."""
        v = self.vllm.summary.makespan_s
        return self.builtin.summary.makespan_s / v if v else float("nan")

    @property
    def speedup(self) -> float:
        """vLLM engine CPU time / built-in engine CPU time."""
        b = self.builtin.cpu_s
        return self.vllm.cpu_s / b if b > 0 else float("inf")

    def within(self, tolerance: float) -> bool:
        return abs(self.makespan_ratio - 1.0) <= tolerance


@dataclass(frozen=True, slots=True)
class TraceComparison:
    """Every policy on one trace."""

    label: str
    engine: str
    rows: tuple[PolicyComparison, ...]

    def ranking(self, engine: str) -> list[str]:
        """Policies from shortest to longest makespan on ``engine``."""
        runs = [(getattr(r, engine).summary.makespan_s, r.policy) for r in self.rows]
        return [p for _, p in sorted(runs)]

    @property
    def same_ranking(self) -> bool:
        return self.ranking("builtin") == self.ranking("vllm")

    @property
    def max_deviation(self) -> float:
        """Largest ``|ratio - 1|`` over the policies."""
        return max((abs(r.makespan_ratio - 1.0) for r in self.rows), default=0.0)

    def passes(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        return self.same_ranking and all(r.within(tolerance) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.label,
            "engine": self.engine,
            "same_ranking": self.same_ranking,
            "ranking_builtin": self.ranking("builtin"),
            "ranking_vllm": self.ranking("vllm"),
            "max_deviation": round(self.max_deviation, 4),
            "policies": [
                {
                    "policy": r.policy,
                    "makespan_ratio": round(r.makespan_ratio, 4),
                    "speedup": round(r.speedup, 1),
                    "builtin": _run_dict(r.builtin),
                    "vllm": _run_dict(r.vllm),
                }
                for r in self.rows
            ],
        }


def _run_dict(run: EngineRun) -> dict[str, Any]:
    return {"wall_s": round(run.wall_s, 2), "cpu_s": round(run.cpu_s, 2), **run.summary.to_dict()}


# ------------------------------------------------------------------ running


def run_timed(job: Job) -> EngineRun:
    """Run one job in this process and time it (wall and CPU)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = run_job(job)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return EngineRun(job.engine_kind, result.summary, wall, cpu)


def _warm_up() -> None:
    """Worker initializer: import vLLM before the first timed job."""
    from concur.sim.vllm_engine import import_vllm

    import_vllm()


ProgressFn = Callable[[str, str, EngineRun], None]


def compare_engines(
    trace: Trace,
    label: str,
    policies: Sequence[str],
    spec: EngineSpec,
    *,
    settings: Any = None,
    options: RunOptions | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> TraceComparison:
    """Run ``trace`` under every policy through both engines.

    ``settings`` is a :class:`~concur.policies.registry.PolicySettings` (defaults if
    ``None``). With ``workers`` > 1 runs go to that many processes (vLLM runs are
    submitted first: they are the long ones).
    """
    from concur.policies.registry import PolicySettings

    _require_vllm()
    pol = settings if settings is not None else PolicySettings()
    opts = options or RunOptions()
    jobs = {
        (engine, p): Job(
            label=p,
            spec=p,
            trace=trace,
            engine=spec,
            settings=pol,
            options=opts,
            seed=seed,
            engine_kind=engine,
        )
        for engine in reversed(ENGINES)
        for p in policies
    }
    runs: dict[tuple[str, str], EngineRun] = {}
    n = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
    if n <= 1:
        _warm_up()
        for key, job in jobs.items():
            runs[key] = run_timed(job)
            if progress is not None:
                progress(key[0], key[1], runs[key])
    else:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_warm_up) as pool:
            futures: dict[tuple[str, str], Future[EngineRun]] = {
                key: pool.submit(run_timed, job) for key, job in jobs.items()
            }
            for key, fut in futures.items():
                runs[key] = fut.result()
                if progress is not None:
                    progress(key[0], key[1], runs[key])
    rows = tuple(
        PolicyComparison(policy=p, builtin=runs[("builtin", p)], vllm=runs[("vllm", p)])
        for p in policies
    )
    return TraceComparison(label=label, engine=spec.describe(), rows=rows)


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "compare-engines needs the vllm extra: pip install 'concur[vllm]' (see docs/vllm.md)"
        )


# ------------------------------------------------------------------ reports


def markdown(cmp: TraceComparison, tolerance: float = DEFAULT_TOLERANCE) -> str:
    """The side-by-side table of one trace, with rankings and a verdict."""
    head = (
        "| policy | makespan s builtin | makespan s vLLM | ratio | hits builtin | hits vLLM "
        "| recomp builtin | recomp vLLM | preempt builtin | preempt vLLM "
        "| wall s builtin | wall s vLLM | cpu s builtin | cpu s vLLM | builtin faster |"
    )
    sep = "|" + "|".join(" --- " for _ in range(15)) + "|"
    lines = [f"### {cmp.label}", "", f"engine: {cmp.engine}", "", head, sep]
    for r in cmp.rows:
        b, v = r.builtin.summary, r.vllm.summary
        flag = "" if r.within(tolerance) else " (!)"
        lines.append(
            f"| {r.policy} | {b.makespan_s:,.1f} | {v.makespan_s:,.1f} | "
            f"{r.makespan_ratio:.3f}{flag} | {100 * b.prefix_hit_rate:.1f}% | "
            f"{100 * v.prefix_hit_rate:.1f}% | {100 * b.recompute_share:.1f}% | "
            f"{100 * v.recompute_share:.1f}% | {b.preemptions:,} | {v.preemptions:,} | "
            f"{r.builtin.wall_s:.1f} | {r.vllm.wall_s:.1f} | {r.builtin.cpu_s:.1f} | "
            f"{r.vllm.cpu_s:.1f} | {r.speedup:.0f}x |"
        )
    rb, rv = cmp.ranking("builtin"), cmp.ranking("vllm")
    lines += [
        "",
        f"ranking (shortest makespan first): builtin {' < '.join(rb)}; "
        f"vLLM {' < '.join(rv)}" + ("" if cmp.same_ranking else " (differs)"),
        f"largest makespan deviation: {100 * cmp.max_deviation:.1f}% "
        f"(target <= {100 * tolerance:.0f}%): " + ("PASS" if cmp.passes(tolerance) else "FAIL"),
    ]
    unfinished = [
        f"{r.policy} ({e})"
        for r in cmp.rows
        for e, run in (("builtin", r.builtin), ("vLLM", r.vllm))
        if run.summary.finished_agents < run.summary.agents
    ]
    if unfinished:
        lines.append(f"unfinished runs (hit --max-time): {', '.join(unfinished)}")
    return "\n".join(lines)


def write_reports(comparisons: Sequence[TraceComparison], out: Path, tolerance: float) -> None:
    """``fidelity.md`` and ``fidelity.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(markdown(c, tolerance) for c in comparisons)
    (out / "fidelity.md").write_text(md + "\n")
    data = {"tolerance": tolerance, "traces": [c.to_dict() for c in comparisons]}
    (out / "fidelity.json").write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------- CLI


def register_compare(sim_subparsers: Any) -> None:
    """Add ``compare-engines`` to ``concur sim``'s subcommands."""
    from concur._cli_config import add_config_arguments
    from concur.sim.cli import DEFAULT_POLICIES, engine_args, trace_args

    p = sim_subparsers.add_parser(
        "compare-engines",
        help="run a trace through the built-in engine and vLLM's own scheduler, side by side",
        description=(
            "Replay one trace under each --policy through both the built-in engine model and "
            "vLLM's real V1 scheduler (needs the vllm extra), and compare makespan, prefix hit "
            "rate, recompute share, preemptions and wall time per policy."
        ),
    )
    trace_args(p)
    engine_args(p, choose_engine=False)
    p.add_argument(
        "--policy",
        action="append",
        metavar="SPEC",
        help=f"policy to run (repeatable). Default: {DEFAULT_POLICIES}",
    )
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: cores)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed |ratio - 1|")
    p.add_argument("--out", type=Path, default=None, help="also write fidelity.md/.json here")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every ratio is within --tolerance and the rankings agree",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_compare_engines)


def cmd_compare_engines(args: argparse.Namespace) -> int:
    from concur._cli_config import settings_from_args
    from concur.policies.registry import PolicyError, build_policy
    from concur.sim.cli import engine_spec, load_trace_arg
    from concur.sim.guide import default_policies

    settings = settings_from_args(args)
    try:
        for spec in args.policy or ():
            build_policy(spec, settings.policy)
        trace, label = load_trace_arg(args)
        engine = engine_spec(args)
        desc = engine.describe()
    except (PolicyError, ValueError, OSError) as exc:
        print(f"concur sim compare-engines: error: {exc}", file=sys.stderr)
        return 2
    policies = list(args.policy or default_policies(trace, engine.build().kv_capacity_tokens))
    options = RunOptions(
        control_interval=settings.control.interval, failure_mode=settings.control.failure_mode
    )
    print(f"trace: {label}, {len(trace.agents)} agents; engine: {desc}", flush=True)

    def progress(engine_kind: str, policy: str, run: EngineRun) -> None:
        s = run.summary
        print(
            f"  {engine_kind:<8} {policy:<12} makespan {s.makespan_s:10,.1f} s  "
            f"wall {run.wall_s:7.1f} s  cpu {run.cpu_s:7.1f} s",
            flush=True,
        )

    try:
        cmp = compare_engines(
            trace,
            label,
            policies,
            engine,
            settings=settings.policy,
            options=options,
            seed=args.seed,
            workers=args.jobs,
            progress=progress,
        )
    except RuntimeError as exc:  # the vllm extra is missing or broken
        print(f"concur sim compare-engines: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(markdown(cmp, args.tolerance))
    if args.out is not None:
        write_reports([cmp], args.out, args.tolerance)
        print(f"\nreport: {args.out}/fidelity.md and fidelity.json")
    return 1 if args.check and not cmp.passes(args.tolerance) else 0
