"""``concur swarm``: replay a trace as real agents against any OpenAI base URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add ``concur swarm`` to the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "swarm",
        help="replay a trace as concurrent agents over HTTP (against concur, concur engine, vLLM)",
        description=(
            "Replay a trace of agents against an OpenAI-compatible server: each agent arrives "
            "at its time (divided by --speed), sends its whole, growing conversation step by "
            "step, pauses for its tool calls (divided by --speed), identifies itself with "
            "X-Concur-Agent-Id and marks its last request with X-Concur-Agent-Done. "
            "Example: concur swarm --shape small --base-url http://127.0.0.1:9000/v1 --speed 20"
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="trace file (native JSONL, or see --format)")
    src.add_argument("--shape", help="generate the trace: swe-swarm, swe-swarm-staggered, ...")
    p.add_argument("--format", default=None, help="--trace's format if not native (importers)")
    p.add_argument("--seed", type=int, default=0, help="seed for --shape")
    p.add_argument("--agents", type=int, default=None, help="override --shape's agent count")
    p.add_argument(
        "--base-url",
        required=True,
        metavar="URL",
        help="OpenAI base URL, e.g. http://127.0.0.1:9000/v1 (concur) or :8000/v1 (the engine)",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="time scale: divide arrivals and tool pauses by this (match concur engine --speed)",
    )
    p.add_argument("--model", default=None, help="model name (default: the first /v1/models)")
    p.add_argument(
        "--concurrency-limit",
        type=int,
        default=None,
        metavar="N",
        help="client-side cap: at most N agents run at once (default: no cap)",
    )
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="wall seconds to wait for a response (queued agents wait in concur)",
    )
    p.add_argument("--no-stream", action="store_true", help="send non-streaming requests")
    p.add_argument("--json", action="store_true", help="print summary and agents as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"concur swarm: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from concur.sim.cli import load_trace_arg
    from concur.sim.swarm.client import SwarmOptions

    try:
        trace, label = load_trace_arg(args)
        options = SwarmOptions(
            base_url=args.base_url,
            speed=args.speed,
            model=args.model,
            concurrency_limit=args.concurrency_limit,
            stream=not args.no_stream,
            max_retries=args.retries,
            read_timeout_s=args.timeout,
            api_key=os.environ.get("OPENAI_API_KEY") or None,
        )
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(
        f"swarm: {label}, {len(trace.agents)} agents -> {options.base_url} at speed "
        f"{options.speed:g}",
        file=sys.stderr,
    )
    try:
        result = asyncio.run(_run(trace, options, quiet=args.quiet))
    except ValueError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C while the agents were being ended
        return 130
    data = result.to_dict()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_summary(result.summary.to_dict())
    s = result.summary
    if s.interrupted:
        print(
            f"concur swarm: interrupted; {s.interrupted} agents stopped before they finished "
            "(those that had started were ended on the server)",
            file=sys.stderr,
        )
        return 130
    if s.failed_agents:
        print(
            f"concur swarm: {s.failed_agents} of {s.agents} agents gave up (errors: {s.errors})",
            file=sys.stderr,
        )
        return 1
    return 0


def _stop_on_interrupt() -> asyncio.Event:
    """An event the first Ctrl-C (or SIGTERM) sets: the swarm then stops its agents, ends
    them on the server and returns what it has, for the summary. A second Ctrl-C
    interrupts as usual."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first(sig: signal.Signals) -> None:
        loop.remove_signal_handler(sig)
        print("\nconcur swarm: stopping; ending the agents (Ctrl-C again to quit)", file=sys.stderr)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, first, sig)
    return stop


async def _run(trace: Any, options: Any, *, quiet: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from concur.sim.swarm.client import run_swarm

    stop = _stop_on_interrupt()
    if quiet:
        return await run_swarm(trace, options, stop=stop)
    with Progress(
        "[bold]agents",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task("agents", total=len(trace.agents))
        return await run_swarm(
            trace,
            options,
            progress=lambda done, _total: bar.update(task, completed=done),
            stop=stop,
        )


def print_summary(s: dict[str, Any]) -> None:
    """The summary as aligned ``label: value`` lines on stdout."""
    hit = s["client_hit_rate"]
    ttft = s["mean_ttft_s"]
    lines = [
        (
            "agents",
            f"{s['finished_agents']}/{s['agents']} finished"
            + (f", {s['interrupted']} interrupted" if s.get("interrupted") else ""),
        ),
        ("makespan", f"{s['makespan_s']:,.1f} s simulated ({s['makespan_wall_s']:,.1f} s wall)"),
        (
            "throughput",
            f"{s['output_tok_per_s']:,.0f} output tok/s, "
            f"{s['total_tok_per_s']:,.0f} total tok/s (simulated)",
        ),
        (
            "tokens",
            f"{s['prompt_tokens']:,} prompt ({s['cached_tokens']:,} cached), "
            f"{s['completion_tokens']:,} output",
        ),
        ("hit rate", "not reported by the server" if hit is None else f"{100 * hit:.1f}%"),
        (
            "agent time",
            f"mean {s['mean_completion_s']:,.1f} s, p50 {s['p50_completion_s']:,.1f} s, "
            f"p99 {s['p99_completion_s']:,.1f} s",
        ),
        ("first token", "-" if ttft is None else f"mean {ttft:.2f} s, p99 {s['p99_ttft_s']:.2f} s"),
        ("requests", f"{s['requests']:,} ({s['retries']} retries)"),
        ("errors", ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"),
    ]
    for label, value in lines:
        print(f"{label:>12}: {value}")
