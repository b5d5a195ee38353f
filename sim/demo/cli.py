"""``concur demo``: the whole story on one machine, no GPU needed.

1. start ``concur engine`` (a simulated vLLM server) with a scenario that
   thrashes without control, and run an agent swarm straight at it;
2. start a fresh engine and ``concur serve --policy aimd`` in front of it, and
   run the same swarm through concur;
3. print a side-by-side table and what concur did (from the runs' own data), write
   ``demo.json`` and ``demo.png`` (both runs: live, paused and queued agents under the
   window, KV usage and hit rate over time), and say what to try next.

Every child process is stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concur.sim.demo.report import RunRecord
    from concur.sim.demo.rigs import Rig
    from concur.sim.demo.scenario import Scenario
    from concur.sim.swarm.client import ProgressFn

DEFAULT_OUT = Path("out/demo")


def register(sub: Any) -> None:
    """Add ``concur demo`` to the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="see concur work on this machine: a simulated vLLM and agents, without and with it",
        description=(
            "Start a simulated vLLM server (concur engine), run a swarm of coding agents "
            "against it directly and then through concur serve --policy aimd, and compare "
            "makespan, throughput, prefix-cache hit rate, preemptions and recomputed tokens. "
            "Writes a table, demo.json and demo.png to --out. Takes about a minute."
        ),
    )
    p.add_argument("--quick", action="store_true", help="a smaller scenario (under 60 s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir ({DEFAULT_OUT})")
    p.add_argument(
        "--speed",
        type=float,
        default=None,
        help="time scale of the simulated engine (default: the scenario's, 10)",
    )
    p.add_argument("--policy", default="aimd", help="concur's policy for the second run")
    p.add_argument(
        "--vllm",
        action="store_true",
        help=(
            "on a real vLLM instead (its CPU build with a tiny model made here, from "
            ".venv-vllm: make vllm-venv), in real time: 4-6 minutes"
        ),
    )
    p.add_argument(
        "--shape",
        default="engine-bound",
        help=(
            "with --vllm, the swarm: engine-bound (the default: control pays), tool-bound "
            "(the engine idles: control cannot pay, and concur stays out of the way) or "
            "staggered"
        ),
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=0.25,
        help="wall seconds between two readings of the engine and concur (0.25)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from concur.sim.demo.rigs import VllmRig
    from concur.sim.demo.scenario import DEFAULT, QUICK, real_scenario
    from concur.sim.procs import ChildFailed

    scenario = QUICK if args.quick else DEFAULT
    rig: VllmRig | None = None
    if args.vllm:
        if args.quick or args.speed is not None:
            print(
                "concur demo: error: --quick and --speed do not apply with --vllm", file=sys.stderr
            )
            return 2
        try:
            scenario = real_scenario(args.shape)
            rig = VllmRig(scenario.kv_tokens)
        except (ValueError, ChildFailed) as exc:
            print(f"concur demo: error: {exc}", file=sys.stderr)
            return 2
    elif args.speed is not None:
        if not args.speed > 0:
            print(f"concur demo: error: --speed must be > 0, got {args.speed}", file=sys.stderr)
            return 2
        scenario = dataclasses.replace(scenario, speed=args.speed)
    try:
        run_demo(
            scenario,
            args.out,
            policy=args.policy,
            sample_interval=args.sample_interval,
            rig=rig,
        )
    except ChildFailed as exc:
        print(f"concur demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nconcur demo: interrupted; every child process was stopped", file=sys.stderr)
        return 130
    return 0


def _progress_run(
    label: str, total: int, coro_factory: Callable[[ProgressFn], Coroutine[Any, Any, RunRecord]]
) -> RunRecord:
    """Run ``coro_factory(progress)`` under a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        f"[bold]{label:<16}",
        BarColumn(),
        MofNCompleteColumn(),
        "agents",
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total)
        return asyncio.run(coro_factory(lambda done, _total: bar.update(task, completed=done)))


def run_demo(
    scenario: Scenario,
    out: Path,
    *,
    policy: str = "aimd",
    sample_interval: float = 0.25,
    rig: Rig | None = None,
) -> dict[str, Any]:
    """Run both halves of the demo and write the report; returns ``demo.json``'s data.

    ``rig``: the engine (default: ``concur engine`` for ``scenario``)."""
    from concur.sim.demo.live import run_live
    from concur.sim.demo.orchestrate import start_concur
    from concur.sim.demo.plot import write_plot
    from concur.sim.demo.report import print_table, write_json
    from concur.sim.demo.rigs import SimRig
    from concur.sim.demo.scenario import live_settings, set_flags
    from concur.sim.demo.story import story
    from concur.sim.procs import Supervisor
    from concur.sim.trace import dump_trace, summarize

    rig = rig or SimRig(scenario)

    started = time.monotonic()
    trace = scenario.trace()
    out.mkdir(parents=True, exist_ok=True)
    dump_trace(trace, out / "trace.jsonl")
    speed = scenario.speed
    info = summarize(trace)
    engine_desc = rig.describe()
    print(f"concur demo ({scenario.name}): {scenario.description}")
    print(
        f"  trace: {info.agents} agents, {info.steps} steps, peak context "
        f"{info.peak_context_tokens:,} tokens, {info.total_output_tokens:,} output tokens"
    )
    print(
        f"  engine: concur engine, {engine_desc}, {speed:g}x real time"
        if rig.simulated
        else f"  engine: {engine_desc}, real time"
    )
    direct_label, controlled_label = "no control", f"concur ({policy})"
    urls: dict[str, str] = {}

    def half(label: str, engine_url: str, concur_url: str | None = None) -> RunRecord:
        return _progress_run(
            label,
            len(trace.agents),
            lambda progress: run_live(
                label,
                trace,
                engine_url=engine_url,
                concur_url=concur_url,
                speed=speed,
                sample_interval=sample_interval,
                progress=progress,
                model=rig.model,
                simulated=rig.simulated,
            ),
        )

    fresh = "engine restarted, cold cache" if rig.simulated else "prefix cache emptied"
    with Supervisor(out / "logs") as sup:
        try:
            engine_url = rig.cold(sup, "engine-direct")
            print(
                f"\n[1/2] agents straight to the engine at {engine_url}/v1 (no admission control)"
            )
            direct = half(direct_label, engine_url)
            engine_url = rig.cold(sup, "engine-concur")
            _proxy, concur_url = start_concur(
                sup,
                "concur-serve",
                engine_url,
                policy=policy,
                settings=set_flags(live_settings(speed)),
            )
            urls = {
                "engine": engine_url,
                "concur": concur_url,
                "status": f"{concur_url}/concur/status",
                "metrics": f"{concur_url}/metrics",
            }
            print(
                f"[2/2] the same agents through concur serve --policy {policy} at "
                f"{concur_url}/v1 ({fresh}, at {engine_url})"
            )
            controlled = half(controlled_label, engine_url, concur_url)
        finally:
            sup.stop_all()
            rig.close()
    wall = time.monotonic() - started
    title = f"{info.agents} agents on {engine_desc}"
    print()
    print_table(direct, controlled, title)
    told = story(direct, controlled)
    meta = {
        "story": told,
        "scenario": scenario.describe(),
        "trace": {"agents": info.agents, "steps": info.steps},
        "engine": engine_desc,
        "policy": policy,
        "urls": urls,
        "wall_s": round(wall, 1),
    }
    write_json(out / "demo.json", meta, [direct, controlled])
    plotted = write_plot(out / "demo.png", direct, controlled, title)
    print(told)
    _print_next(out, scenario, urls, policy, wall, plotted)
    return {"meta": meta, "direct": direct.figures(), "controlled": controlled.figures()}


def _print_next(
    out: Path, scenario: Scenario, urls: dict[str, str], policy: str, wall: float, plotted: bool
) -> None:
    from concur.sim.demo.scenario import live_settings

    spec = scenario.engine_spec()
    engine_flags = (
        f"--preset {scenario.preset} --kv-tokens {scenario.kv_tokens}"
        if scenario.preset
        else f"--model {spec.model} --gpu {spec.gpu} --tp {spec.tp} "
        f"--kv-tokens {scenario.kv_tokens}"
    )
    plot = (
        f"{out}/demo.png (both runs: live, paused and queued agents under the window, "
        "KV usage and hit rate over time)"
        if plotted
        else "no plot (matplotlib is missing: pip install 'concur[sim]')"
    )
    print(
        f"\nwrote {out}/demo.json, {plot}, {out}/trace.jsonl and child logs in "
        f"{out}/logs/  [{wall:.0f} s]"
    )
    if urls:
        print(
            f"during the run, concur's status was at {urls['status']} and its Prometheus "
            f"metrics at {urls['metrics']} (the engine's at {urls['engine']}/metrics)"
        )
    print("\nwhat to try next:")
    print(
        f"  concur sim run --trace {out}/trace.jsonl {engine_flags}\n"
        "      the same swarm offline in seconds under several policies (unlimited, a static "
        "cap, aimd:paper, aimd:cache, aimd; --policy to choose)"
    )
    if scenario.preset:
        print(
            f"  make vllm-engine    # the same vLLM on 127.0.0.1:8000, then:\n"
            f"  concur serve --upstream http://127.0.0.1:8000 --policy {policy} "
            "--listen 127.0.0.1:9000\n"
            f"  concur swarm --trace {out}/trace.jsonl --base-url http://127.0.0.1:9000/v1\n"
            "      the same by hand; watch curl http://127.0.0.1:9000/concur/status meanwhile\n"
            "  concur demo --vllm --shape tool-bound\n"
            "      a swarm whose engine idles between steps: no admission control can make "
            "it faster, and concur's default steps aside"
        )
        return
    speed = scenario.speed
    scaled = live_settings(speed)
    sets = " ".join(
        f"--set {k}={scaled[k]:g}"
        for k in (
            "control.interval",
            "engine.poll_interval",
            "policy.aimd.decrease_cooldown",
            "policy.aimd.open_dwell",
            "admission.max_queue_wait",
        )
    )
    print(
        f"  concur engine {engine_flags} --speed {speed:g} --port 8000\n"
        f"  concur serve --upstream http://127.0.0.1:8000 --policy {policy} "
        f"--listen 127.0.0.1:9000 {sets}\n"
        f"  concur swarm --trace {out}/trace.jsonl --base-url http://127.0.0.1:9000/v1 "
        f"--speed {speed:g}\n"
        "      the same by hand (the --set flags run concur's control loop at the engine's "
        "speed); watch curl http://127.0.0.1:9000/concur/status meanwhile"
    )
    print(
        "  concur serve --upstream http://<your-vllm>:8000 --policy aimd\n"
        "      in front of a real vLLM: point your agents' OpenAI base URL at concur"
    )
