"""``concur sim sweep``: one run per value of one parameter (static caps, AIMD fields)."""

from __future__ import annotations

import argparse
from typing import Any

from concur.sim.cli import (
    _fail,
    _print_table,
    _settings,
    _write_reports_without_plots,
    engine_spec,
    load_trace_arg,
    run_with_progress,
)


def sweep_jobs(args: argparse.Namespace, settings: Any, trace: Any, engine: Any) -> list[Any]:
    """One job per value of ``--param``."""
    from concur.policies.registry import PolicySettings
    from concur.sim.batch import Job
    from concur.sim.runner import RunOptions

    options = RunOptions(
        control_interval=settings.control.interval, failure_mode=settings.control.failure_mode
    )
    values = [v.strip() for v in str(args.values).split(",") if v.strip()]
    if not values:
        raise ValueError("--values needs at least one value")
    jobs: list[Job] = []

    def job(label: str, spec: str, pol: PolicySettings) -> Job:
        return Job(label, spec, trace, engine, pol, options, args.seed, args.engine)

    if args.baseline:
        jobs.append(job("unlimited", "unlimited", settings.policy))
    if args.param == "static":
        for v in values:
            jobs.append(job(f"static:{v}", f"static:{v}", settings.policy))
        return jobs
    section, _, field = args.param.partition(".")
    if not field or section not in ("aimd", "fit", "epp", "static"):
        raise ValueError(
            f"--param must be 'static' or a dotted policy field such as aimd.high, got "
            f"{args.param!r}"
        )
    for v in values:
        data = settings.policy.model_dump(exclude_unset=True)
        data.setdefault(section, {})[field] = _parse_value(v)
        try:
            pol = PolicySettings.model_validate(data)
        except Exception as exc:  # pydantic's ValidationError, re-worded for the CLI
            raise ValueError(f"{args.param}={v}: {exc}") from None
        jobs.append(job(f"{args.policy} {field}={v}", args.policy, pol))
    return jobs


def _parse_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_sweep(args: argparse.Namespace) -> int:
    from concur.sim.report import write_all

    settings = _settings(args)
    try:
        trace, label = load_trace_arg(args)
        engine = engine_spec(args)
        jobs = sweep_jobs(args, settings, trace, engine)
        engine_desc = engine.describe()
        capacity = engine.build().kv_capacity_tokens
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(f"sweep {args.param} over {args.values} on {label}; engine: {engine_desc}")
    results = run_with_progress(jobs, args.jobs)
    swept = [r for r in results if r.summary.policy != "unlimited"]
    done = [r for r in swept if r.summary.finished_agents == r.summary.agents] or swept
    best = min(done, key=lambda r: r.summary.makespan_s)
    _print_table(results, f"sweep of {args.param} on {label}", capacity, trace)
    print(f"best: {best.summary.policy} (makespan {best.summary.makespan_s:,.1f} s)")
    meta = {
        "trace": label,
        "engine": engine_desc,
        "kv_capacity_tokens": capacity,
        "param": args.param,
        "best": best.summary.policy,
    }
    if args.no_plots:
        _write_reports_without_plots(results, args.out, meta, trace)
    else:
        write_all(results, args.out, meta, trace)
    print(f"report: {args.out}/summary.md")
    return 0
