"""Offline simulator vs live path: the same trace, seed, engine and policy, two worlds.

    .venv/bin/python bench/consistency.py [--scenario quick|default] [--speed 5]
        [--policy unlimited --policy aimd --policy static:8] [--interval 1.0]

For each policy, runs the trace

* offline: ``concur sim``'s runner (virtual time, the same EngineSpec, policy and
  control interval), and
* live: ``concur swarm`` through ``concur serve --policy P`` to ``concur engine
  --speed S`` (child processes on loopback; a fresh engine per policy; the
  proxy's control interval, poll interval and AIMD cooldown divided by S, see
  :func:`concur.sim.demo.scenario.live_settings`),

and prints makespans side by side with their ratio (live / offline), hit rates,
and how far the engine loop fell behind its schedule (``max lag``, in simulated
seconds: above a few seconds the host is too slow for that speed). The target is
a ratio within 15% of 1.0 per policy.

Speed: every request pays a few tens of wall milliseconds on its way (client JSON,
proxy hop, the engine parsing and tokenizing the whole context) that the offline
simulator does not have; in simulated time that costs ``speed`` times as much, and
it matters most when few agents are live (the engine is not saturated). On two
loaded cores, speed 5 keeps every policy within 10%; at 10 (the demo's speed)
``aimd`` drifts to 1.14-1.23x. Hence the default of 5 here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from concur.sim.batch import Job, run_job
from concur.sim.demo.live import fetch_json, run_live
from concur.sim.demo.orchestrate import start_concur, start_engine
from concur.sim.demo.scenario import SCENARIOS, Scenario, live_settings, set_flags
from concur.sim.procs import Supervisor, free_port
from concur.sim.runner import RunOptions

TOLERANCE = 0.15


def offline(scenario: Scenario, policy: str, interval: float) -> dict[str, Any]:
    trace = scenario.trace()
    result = run_job(
        Job(
            label=policy,
            spec=policy,
            trace=trace,
            engine=scenario.engine_spec(),
            options=RunOptions(control_interval=interval),
            seed=scenario.seed,
        )
    )
    s = result.summary
    return {
        "makespan_s": s.makespan_s,
        "hit_rate": s.prefix_hit_rate,
        "recomputed_tokens": s.recomputed_tokens,
        "finished": s.finished_agents,
        "max_window": s.max_window,
    }


def live(scenario: Scenario, policy: str, interval: float, logs: Path) -> dict[str, Any]:
    trace = scenario.trace()
    with Supervisor(logs) as sup:
        _engine, engine_url = start_engine(sup, "engine", scenario.engine_args(free_port()))
        settings = set_flags(live_settings(scenario.speed, interval))
        _proxy, concur_url = start_concur(
            sup, "concur", engine_url, policy=policy, settings=settings
        )
        rec = asyncio.run(
            run_live(
                policy, trace, engine_url=engine_url, concur_url=concur_url, speed=scenario.speed
            )
        )
        stats = asyncio.run(fetch_json(f"{engine_url}/sim/stats"))
    s = rec.swarm
    windows = [x.window for x in rec.samples if x.window is not None]
    return {
        "makespan_s": s["makespan_s"],
        "wall_s": s["makespan_wall_s"],
        "hit_rate": stats.get("hit_rate"),
        "recomputed_tokens": stats.get("stats", {}).get("recomputed_tokens"),
        "finished": s["finished_agents"],
        "errors": s["errors"],
        "max_lag_sim_s": round(float(stats.get("max_lag_s", 0.0)) * scenario.speed, 2),
        "max_window": max(windows, default=None),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="quick")
    ap.add_argument("--speed", type=float, default=5.0, help="engine speed (default: 5)")
    ap.add_argument("--agents", type=int, default=None, help="override the scenario's agents")
    ap.add_argument("--policy", action="append", help="default: unlimited, aimd, static:8")
    ap.add_argument("--interval", type=float, default=1.0, help="control interval, simulated s")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    scenario = SCENARIOS[args.scenario]
    scenario = dataclasses.replace(scenario, speed=args.speed)
    if args.agents is not None:
        scenario = dataclasses.replace(
            scenario, overrides={**scenario.overrides, "agents": args.agents}
        )
    policies = args.policy or ["unlimited", "aimd", "static:8"]
    trace = scenario.trace()
    print(
        f"scenario {scenario.name}: {len(trace.agents)} agents, "
        f"{scenario.engine_spec().describe()}, "
        f"speed {scenario.speed:g}, control interval {args.interval:g} s; "
        f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="concur-consistency-") as tmp:
        for policy in policies:
            t0 = time.monotonic()
            off = offline(scenario, policy, args.interval)
            t1 = time.monotonic()
            on = live(scenario, policy, args.interval, Path(tmp) / policy.replace(":", "_"))
            t2 = time.monotonic()
            ratio = on["makespan_s"] / off["makespan_s"] if off["makespan_s"] else float("nan")
            rows.append(
                {
                    "policy": policy,
                    "offline": off,
                    "live": on,
                    "ratio": round(ratio, 3),
                    "offline_wall_s": round(t1 - t0, 1),
                    "live_wall_s": round(t2 - t1, 1),
                }
            )
            print(f"  {policy}: offline {off['makespan_s']:.1f} s, live {on['makespan_s']:.1f} s")
            sys.stdout.flush()
    head = (
        f"{'policy':<11} {'offline s':>10} {'live s':>9} {'live/off':>9} {'off hits':>9} "
        f"{'live hits':>10} {'off win':>8} {'live win':>9} {'lag s':>6} {'ok':>3}"
    )
    print()
    print(head)
    print("-" * len(head))
    worst = 0.0
    for r in rows:
        off, on = r["offline"], r["live"]
        dev = abs(r["ratio"] - 1.0)
        worst = max(worst, dev)
        live_hits = on["hit_rate"]
        print(
            f"{r['policy']:<11} {off['makespan_s']:>10.1f} {on['makespan_s']:>9.1f} "
            f"{r['ratio']:>9.3f} {100 * off['hit_rate']:>8.1f}% "
            f"{'-' if live_hits is None else f'{100 * live_hits:.1f}%':>10} "
            f"{off['max_window'] if off['max_window'] is not None else '-':>8} "
            f"{on['max_window'] if on['max_window'] is not None else '-':>9} "
            f"{on['max_lag_sim_s']:>6.1f} {'yes' if dev <= TOLERANCE else 'NO':>3}"
        )
    print(f"\nworst deviation {100 * worst:.1f}% (target <= {100 * TOLERANCE:.0f}%)")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
