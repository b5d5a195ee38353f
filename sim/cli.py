"""``concur sim``: generate, import and replay agent traces under several policies."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from concur.policies.registry import POLICY_SPECS

DEFAULT_POLICIES = (
    "unlimited, static:N (N: the agents the KV cache holds), aimd:paper, aimd:cache, aimd"
)
"""`concur sim run`'s policies without `--policy`: see :func:`concur.sim.guide.default_policies`."""


def register(sub: Any) -> None:
    sim = sub.add_parser(
        "sim",
        help="replay agent traces through a simulated vLLM engine under several policies",
        description=(
            "Offline what-if for admission control: replay a trace of agents through a model "
            "of a vLLM engine (paged KV blocks, prefix caching with LRU eviction, continuous "
            "batching, recompute preemption, roofline step time) under several policies, "
            "with the very same admission gate and policy code as 'concur serve'."
        ),
    )
    sim.set_defaults(func=lambda _a: (sim.print_help(), 0)[1])
    s = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")

    run = s.add_parser(
        "run",
        help="replay one trace under several policies and compare them",
        description="Replay one trace under each --policy and write a comparison report.",
    )
    trace_args(run)
    engine_args(run)
    run.add_argument(
        "--policy",
        action="append",
        metavar="SPEC",
        help=(
            f"policy to run (repeatable): {POLICY_SPECS}. Default: {DEFAULT_POLICIES}; "
            "static:N only when N is below the trace's agent count"
        ),
    )
    run.add_argument("--out", type=Path, default=Path("out/sim"), help="report directory")
    run.add_argument("--jobs", type=int, default=None, help="parallel processes (default: cores)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _config_args(run)
    run.set_defaults(func=cmd_run)

    sweep = s.add_parser(
        "sweep",
        help="sweep one parameter (static caps, AIMD high/low/alpha/beta, ...) and find the best",
        description=(
            "Run the trace once per value of one parameter. --param static sweeps fixed caps "
            "(values are N); any other --param is a dotted policy field under the base "
            "--policy, e.g. --policy aimd --param aimd.high --values 0.8,0.85,0.9."
        ),
    )
    trace_args(sweep)
    engine_args(sweep)
    sweep.add_argument("--param", required=True, help="'static' or a dotted field: aimd.high")
    sweep.add_argument("--values", required=True, help="comma-separated values")
    sweep.add_argument("--policy", default="aimd", help="base policy for a field sweep")
    sweep.add_argument("--baseline", action="store_true", help="also run 'unlimited'")
    sweep.add_argument("--out", type=Path, default=Path("out/sweep"), help="report directory")
    sweep.add_argument("--jobs", type=int, default=None)
    sweep.add_argument("--no-plots", action="store_true")
    _config_args(sweep)
    from concur.sim.sweep import cmd_sweep

    sweep.set_defaults(func=cmd_sweep)

    gen = s.add_parser(
        "gen",
        help="generate a synthetic trace of a named shape",
        description="Write a seeded synthetic trace in concur's native JSONL format.",
    )
    gen.add_argument(
        "shape",
        help=(
            "small (a first try), swe-swarm, swe-swarm-staggered, chat, tool-bound, "
            "engine-bound, staggered or tiny"
        ),
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--agents", type=int, default=None, help="override the shape's agent count")
    gen.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    gen.set_defaults(func=cmd_gen)

    imp = s.add_parser(
        "import",
        help="convert a public trace (TraceLab, Mooncake, Qwen-Bailian) to the native format",
        description="Convert a public trace file to concur's native JSONL format.",
    )
    imp.add_argument("path", type=Path, help="input trace file")
    imp.add_argument("--format", default=None, help="input format (default: detect)")
    imp.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    imp.set_defaults(func=cmd_import)

    info = s.add_parser("info", help="print a trace's headline numbers")
    info.add_argument("path", type=Path)
    info.add_argument("--format", default=None, help="input format if not native")
    info.set_defaults(func=cmd_info)

    from concur.sim.compare import register_compare

    register_compare(s)


def trace_args(p: argparse.ArgumentParser) -> None:
    """The trace's flags: ``--trace``/``--format`` or ``--shape``/``--seed``/``--agents``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--trace", type=Path, help="trace file (native JSONL, or see --format)")
    g.add_argument("--shape", default=None, help="generate the trace instead (default: swe-swarm)")
    p.add_argument("--format", default=None, help="--trace's format if not native (importers)")
    p.add_argument("--seed", type=int, default=0, help="seed for --shape")
    p.add_argument("--agents", type=int, default=None, help="override --shape's agent count")


def engine_args(p: argparse.ArgumentParser, *, choose_engine: bool = True) -> None:
    """The engine's flags (``--model ... --preset``; ``--engine`` when ``choose_engine``)."""
    p.add_argument("--model", default="qwen3-32b", help="llama-3-8b, qwen3-8b, qwen3-32b, ...")
    p.add_argument("--gpu", default="h100", help="h100, h200 or a100")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree")
    p.add_argument(
        "--kv-tokens", type=int, default=None, help="KV capacity in tokens (default: from memory)"
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 (or the preset's)")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default: 8192 (or the preset's)"
    )
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help=(
            "a measured engine instead of the model/GPU roofline: cpu-tiny (vLLM's CPU build "
            "serving concur's tiny model, as bench/real_engine.py runs it; fitted by "
            "bench/engine_costs.py)"
        ),
    )
    scheduling_policy_arg(p)
    if not choose_engine:
        return
    p.add_argument(
        "--engine",
        choices=("builtin", "vllm"),
        default="builtin",
        help="built-in engine model, or vLLM's own scheduler (needs the vllm extra)",
    )


def scheduling_policy_arg(p: Any, also: str = "") -> None:
    """``--scheduling-policy`` on ``p`` (a parser or an argument group)."""
    from concur.sim.scheduler import SCHEDULING_POLICIES

    p.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        default="fcfs",
        help=(
            f"vLLM's --scheduling-policy{also}: fcfs (its default) or priority, which serves "
            "the request with the lowest 'priority' first; concur stamps each agent step "
            "with the steps its agent has done (admission.engine_priority)"
        ),
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    from concur._cli_config import add_config_arguments

    add_config_arguments(p)


# ------------------------------------------------------------------ helpers


def load_trace_arg(args: argparse.Namespace) -> tuple[Any, str]:
    """The trace named by --trace/--format or generated by --shape/--seed/--agents."""
    from concur.sim.generate import generate
    from concur.sim.importers import import_trace
    from concur.sim.trace import load_trace

    if getattr(args, "trace", None) is not None:
        path: Path = args.trace
        if args.format:
            return import_trace(args.format, path), path.name
        return load_trace(path), path.name
    shape = args.shape or "swe-swarm"
    overrides = {"agents": args.agents} if args.agents else {}
    label = f"{shape} (seed {args.seed}" + (f", {args.agents} agents)" if args.agents else ")")
    return generate(shape, args.seed, **overrides), label


def engine_spec(args: argparse.Namespace) -> Any:
    """The engine of ``--model --gpu --tp --kv-tokens ...``, or of ``--preset``."""
    from concur.sim.engine_config import EngineSpec

    if args.preset is not None:
        return EngineSpec.from_preset(
            args.preset,
            kv_capacity_tokens=args.kv_tokens,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            scheduling_policy=args.scheduling_policy,
        )
    return EngineSpec(
        model=args.model,
        gpu=args.gpu,
        tp=args.tp,
        kv_capacity_tokens=args.kv_tokens,
        max_num_seqs=args.max_num_seqs or 256,
        max_num_batched_tokens=args.max_num_batched_tokens or 8192,
        scheduling_policy=args.scheduling_policy,
    )


def _fail(message: str) -> int:
    print(f"concur sim: error: {message}", file=sys.stderr)
    return 2


def run_with_progress(jobs: Sequence[Any], workers: int | None) -> list[Any]:
    """Run jobs with a rich progress bar (one bar per policy), plain text if not a TTY."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from concur.sim.batch import run_jobs

    with Progress(
        "[bold]{task.description:<16}",
        BarColumn(),
        MofNCompleteColumn(),
        "agents",
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        tasks = {j.label: bar.add_task(j.label, total=len(j.trace.agents)) for j in jobs}

        def update(label: str, done: int, total: int) -> None:
            bar.update(tasks[label], completed=done, total=total)

        return run_jobs(jobs, workers=workers, progress=update)


def _print_table(
    results: Sequence[Any], title: str, capacity: int | None = None, trace: Any = None
) -> None:
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.table import Table

    from concur.sim.guide import closing_text
    from concur.sim.report import COLUMNS, TERMINAL_COLUMNS, explain, rows

    heads = dict(COLUMNS)
    table = Table(title=title, title_justify="left")
    for key in TERMINAL_COLUMNS:
        table.add_column(heads[key], justify="left" if key == "policy" else "right")
    for r in rows([x.summary for x in results]):
        table.add_row(*(r[k] for k in TERMINAL_COLUMNS))
    probe = Console()
    # Logs and pipes get a table wide enough not to wrap; a terminal keeps its width.
    console = probe if probe.is_terminal else Console(width=120)
    console.print(table)
    console.print(Markdown(explain([x.summary for x in results])))
    console.print()
    console.print(Markdown(closing_text(results, capacity, trace)))


def _settings(args: argparse.Namespace) -> Any:
    from concur._cli_config import settings_from_args

    return settings_from_args(args)


# ----------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from concur.policies.registry import PolicyError, build_policy
    from concur.sim.batch import Job
    from concur.sim.guide import default_policies
    from concur.sim.report import write_all
    from concur.sim.runner import RunOptions

    settings = _settings(args)
    try:
        for spec in args.policy or ():
            build_policy(spec, settings.policy)
        trace, label = load_trace_arg(args)
        engine = engine_spec(args)
        engine_desc = engine.describe()
        capacity = engine.build().kv_capacity_tokens
    except (PolicyError, ValueError, OSError) as exc:
        return _fail(str(exc))
    specs = args.policy or default_policies(trace, capacity)
    options = RunOptions(
        control_interval=settings.control.interval, failure_mode=settings.control.failure_mode
    )
    jobs = [
        Job(
            label=spec,
            spec=spec,
            trace=trace,
            engine=engine,
            settings=settings.policy,
            options=options,
            seed=args.seed,
            engine_kind=args.engine,
        )
        for spec in specs
    ]
    print(f"trace: {label}, {len(trace.agents)} agents; engine: {engine_desc}")
    started = time.monotonic()
    results = run_with_progress(jobs, args.jobs)
    wall = time.monotonic() - started
    meta = {
        "trace": label,
        "engine": engine_desc,
        "engine_kind": args.engine,
        "kv_capacity_tokens": capacity,
        "control_interval_s": options.control_interval,
        "wall_s": round(wall, 1),
    }
    _print_table(results, f"{label} on {engine_desc}", capacity, trace)
    if args.no_plots:
        _write_reports_without_plots(results, args.out, meta, trace)
    else:
        write_all(results, args.out, meta, trace)
    print(f"report: {args.out}/summary.md (also summary.json and PNG plots); wall {wall:.1f}s")
    return 0


def _write_reports_without_plots(
    results: Sequence[Any], out: Path, meta: dict[str, Any], trace: Any = None
) -> None:
    from concur.sim.report import write_json, write_markdown

    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "summary.json", meta)
    write_markdown(results, out / "summary.md", meta, trace)


def cmd_gen(args: argparse.Namespace) -> int:
    from concur.sim.generate import GenerateError, generate
    from concur.sim.trace import dump_trace, summarize

    overrides = {"agents": args.agents} if args.agents else {}
    try:
        trace = generate(args.shape, args.seed, **overrides)
    except GenerateError as exc:
        return _fail(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dump_trace(trace, args.out)
    print(f"wrote {args.out}")
    print("\n".join(summarize(trace).lines()))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from concur.sim.importers import import_trace
    from concur.sim.trace import dump_trace, summarize

    try:
        trace = import_trace(args.format, args.path)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dump_trace(trace, args.out)
    print(f"wrote {args.out}")
    print("\n".join(summarize(trace).lines()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from concur.sim.importers import import_trace
    from concur.sim.trace import load_trace, summarize

    loader: Callable[[], Any] = (
        (lambda: import_trace(args.format, args.path))
        if args.format
        else (lambda: load_trace(args.path))
    )
    try:
        trace = loader()
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print("\n".join(summarize(trace).lines()))
    return 0
