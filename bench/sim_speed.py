"""Simulator speed: wall time, engine steps/s and simulated tokens/s per policy on swe-swarm.

    .venv/bin/python bench/sim_speed.py [--agents 256] [--policy unlimited --policy aimd ...]

Runs each policy once, in this process, one after another (so the figures are
comparable on a noisy machine), and prints one row per policy. The target is
<= 20 s wall per policy run on swe-swarm (256 agents) on a 2-core machine.
"""

from __future__ import annotations

import argparse
import platform
import time

from concur.sim.batch import Job, run_job
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate

POLICIES = ("unlimited", "static:32", "aimd:kv", "aimd:paper", "aimd", "fit", "epp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", action="append")
    args = ap.parse_args()
    overrides = {"agents": args.agents} if args.agents != 256 else {}
    trace = generate("swe-swarm", args.seed, **overrides)
    engine = EngineSpec()
    print(f"swe-swarm seed {args.seed}, {len(trace.agents)} agents; {engine.describe()}")
    print(
        f"machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}"
    )
    head = f"{'policy':<12} {'wall s':>8} {'sim s':>10} {'steps':>9} {'steps/s':>9} {'tok/s':>11}"
    print(head)
    print("-" * len(head))
    worst = 0.0
    for spec in args.policy or POLICIES:
        t0 = time.perf_counter()
        result = run_job(Job(label=spec, spec=spec, trace=trace, engine=engine, seed=args.seed))
        wall = time.perf_counter() - t0
        s = result.summary
        tokens = s.prefill_tokens + s.output_tokens
        worst = max(worst, wall)
        print(
            f"{spec:<12} {wall:8.1f} {s.makespan_s:10.0f} {s.engine_steps:9,d} "
            f"{s.engine_steps / wall:9,.0f} {tokens / wall:11,.0f}"
        )
    verdict = "meets" if worst <= 20 else "misses"
    print(f"slowest run: {worst:.1f} s wall ({verdict} the <= 20 s target)")


if __name__ == "__main__":
    main()
