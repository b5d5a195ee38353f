"""Simulator speed: wall time, engine steps/s and simulated tokens/s per policy on swe-swarm.

    .venv/bin/python bench/sim_speed.py [--agents 256] [--policy unlimited --policy aimd ...]

Runs each policy once, in this process, one after another (so the figures are
comparable on a noisy machine), and prints one row per policy: wall and CPU
seconds (CPU time is what to compare when other processes share the machine;
the load average is printed before and after), simulated seconds, engine steps
and simulated tokens (prefill + output) per wall second. The target is <= 20 s
wall per policy run on swe-swarm (256 agents) on a 2-core machine.

``--no-fast-forward`` steps the engine one step at a time (``EngineConfig.fast_forward``
off), for a side-by-side measure of what fast-forwarding pure-decode runs saves;
the summaries are identical either way (``tests/sim/test_fastforward.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

from concur.policies.registry import build_policy
from concur.sim.batch import Job, run_job
from concur.sim.engine import EngineModel
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.runner import Runner, RunResult
from concur.sim.trace import Trace

POLICIES = ("unlimited", "static:32", "aimd:kv", "aimd:paper", "aimd", "fit", "epp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", action="append")
    ap.add_argument(
        "--no-fast-forward",
        action="store_true",
        help="step the engine one step at a time (to measure what fast-forward saves)",
    )
    args = ap.parse_args()
    overrides = {"agents": args.agents} if args.agents != 256 else {}
    trace = generate("swe-swarm", args.seed, **overrides)
    engine = EngineSpec()
    print(f"swe-swarm seed {args.seed}, {len(trace.agents)} agents; {engine.describe()}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"fast-forward {'off' if args.no_fast_forward else 'on'}"
    )
    print(f"load average before: {_load()}")
    head = (
        f"{'policy':<12} {'wall s':>8} {'cpu s':>8} {'sim s':>10} {'steps':>9} "
        f"{'steps/s':>9} {'tok/s':>11}"
    )
    print(head)
    print("-" * len(head))
    worst = 0.0
    for spec in args.policy or POLICIES:
        t0 = time.perf_counter()
        c0 = time.process_time()
        result = _run(spec, trace, engine, args.seed, fast_forward=not args.no_fast_forward)
        cpu = time.process_time() - c0
        wall = time.perf_counter() - t0
        s = result.summary
        tokens = s.prefill_tokens + s.output_tokens
        worst = max(worst, wall)
        print(
            f"{spec:<12} {wall:8.1f} {cpu:8.1f} {s.makespan_s:10.0f} {s.engine_steps:9,d} "
            f"{s.engine_steps / wall:9,.0f} {tokens / wall:11,.0f}",
            flush=True,
        )
    verdict = "meets" if worst <= 20 else "misses"
    print(f"load average after: {_load()}")
    print(f"slowest run: {worst:.1f} s wall ({verdict} the <= 20 s target)")


def _run(
    spec: str, trace: Trace, engine: EngineSpec, seed: int, *, fast_forward: bool
) -> RunResult:
    if fast_forward:
        return run_job(Job(label=spec, spec=spec, trace=trace, engine=engine, seed=seed))
    # The same run as run_job's, on an engine that steps one step at a time.
    config = dataclasses.replace(engine.build(), fast_forward=False)
    runner = Runner(
        trace, EngineModel(config), build_policy(spec), seed=seed, block_size=engine.block_size
    )
    return runner.run()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
