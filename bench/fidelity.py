"""Fidelity of the built-in engine model against vLLM's own scheduler.

    .venv-vllm/bin/python bench/fidelity.py [--agents 32] [--jobs 2] [--out out/fidelity]

Runs ``swe-swarm`` and ``swe-swarm-staggered`` (scaled down to ``--agents``: vLLM's
scheduler replays a 256-agent swarm in tens of minutes per policy on 2 cores) and the
TraceLab import (``/work/shared/traces/tracelab_multi_session_large.csv`` or
``--tracelab PATH``) under every policy through both engines, with the default engine
(Qwen3-32B on 2 x H100). Prints, per trace, makespan, hit rate, recompute share and
preemptions of both engines side by side, the makespan ratio (built-in / vLLM), the
wall and CPU time of each engine's run and how much faster (in CPU time: the machine
may be shared) the built-in engine was; then one
line per trace: within 15% for every policy and the same ranking, or not.

Needs the vllm extra (see docs/vllm.md); exits 1 if any trace misses the target.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from concur.sim.compare import (
    DEFAULT_TOLERANCE,
    EngineRun,
    TraceComparison,
    compare_engines,
    markdown,
    write_reports,
)
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.importers import import_trace

TRACELAB = Path("/work/shared/traces/tracelab_multi_session_large.csv")


def _progress(engine: str, policy: str, run: EngineRun) -> None:
    s = run.summary
    print(
        f"  {engine:<8} {policy:<12} makespan {s.makespan_s:10,.1f} s  "
        f"wall {run.wall_s:7.1f} s  cpu {run.cpu_s:7.1f} s"
    )
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=32, help="agents of the swe-swarm shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--static", type=int, default=16, help="N of the static:N policy")
    ap.add_argument("--policy", action="append", help="policies (default: all seven)")
    ap.add_argument("--trace", action="append", help="swe-swarm, swe-swarm-staggered, tracelab")
    ap.add_argument("--tracelab", type=Path, default=TRACELAB, help="TraceLab CSV")
    ap.add_argument("--jobs", type=int, default=None, help="parallel processes")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    ap.add_argument("--out", type=Path, default=Path("out/fidelity"))
    args = ap.parse_args()

    policies = args.policy or [
        "unlimited",
        f"static:{args.static}",
        "aimd",
        "aimd:kv",
        "aimd:paper",
        "fit",
        "epp",
    ]
    spec = EngineSpec()
    print(f"engine: {spec.describe()}; policies: {' '.join(policies)}")
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    traces = args.trace or ["swe-swarm", "swe-swarm-staggered", "tracelab"]
    results: list[TraceComparison] = []
    started = time.perf_counter()
    for name in traces:
        if name == "tracelab":
            trace = import_trace("tracelab-csv", args.tracelab)
            label = f"TraceLab {args.tracelab.name} ({len(trace.agents)} agents)"
        else:
            trace = generate(name, args.seed, agents=args.agents)
            label = f"{name} (seed {args.seed}, {args.agents} agents)"
        print(f"\n{label}")
        results.append(
            compare_engines(
                trace, label, policies, spec, seed=args.seed, workers=args.jobs, progress=_progress
            )
        )
    wall = time.perf_counter() - started
    print()
    for cmp in results:
        print(markdown(cmp, args.tolerance))
        print()
    speedups = [r.speedup for c in results for r in c.rows]
    print(
        f"built-in engine faster (CPU time) by {min(speedups):.0f}x (min), "
        f"{statistics.median(speedups):.0f}x (median) over {len(speedups)} runs; "
        f"total wall {wall / 60:.1f} min"
    )
    ok = True
    for cmp in results:
        verdict = "PASS" if cmp.passes(args.tolerance) else "FAIL"
        ok = ok and verdict == "PASS"
        print(
            f"{verdict}: {cmp.label}: largest deviation {100 * cmp.max_deviation:.1f}%, "
            f"same ranking: {'yes' if cmp.same_ranking else 'no'}"
        )
    write_reports(results, args.out, args.tolerance)
    print(f"report: {args.out}/fidelity.md and fidelity.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
