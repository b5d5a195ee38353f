"""What quieting the window costs: makespan against window churn, in the simulator.

    .venv/bin/python bench/churn.py [--regime engine-bound] [--policy SPEC ...]
        [--seeds 0-3] [--pace 2.3] [--costs docs/engine-costs-2021.json] [--jobs 2]

Replays one of ``bench/real_engine.py``'s regimes through ``concur sim`` (the
``cpu-tiny`` preset, its step time refitted from ``--costs``, vLLM's priority
scheduler, tool pauses and arrivals paced as the real runs were) under each policy,
over several seeds of the trace, and prints per policy, as means over the seeds: the
makespan against no control's on the same seed, window changes per minute and per
finished agent, and the most pauses any one agent took. Policies are given as
``bench/real_engine.py`` takes them (``aimd+low=0.65`` sets one parameter). The
defaults reproduce the churn study in docs/real-engine.md.

Where each agent is a large share of the cache the window moves about once per agent
that finishes (0.75-1.2 times here, by ``low``): the count of agents that fit changes as
they grow and end. So a churn figure per minute means little without the agents'
turnover beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import engine_costs
from real_engine import REGIMES, simulate

DEFAULT_POLICIES = ("none", "static:4", "aimd", "aimd+low=0.65", "aimd+low=0.6", "aimd+low=0.55")


def seeds(text: str) -> list[int]:
    """``0-3`` or ``0,2,5``: the trace seeds to replay."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            out = list(range(lo, hi + 1))
        else:
            out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as 0-3 or 0,2,5") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: no seed in that range")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=REGIMES, default="engine-bound")
    ap.add_argument("--policy", action="append", help=f"default: {' '.join(DEFAULT_POLICIES)}")
    ap.add_argument("--seeds", type=seeds, default=[0, 1, 2, 3], help="0-3 (default) or 0,2,5")
    ap.add_argument("--pace", type=float, default=2.3, help="tool pauses and arrivals x this")
    ap.add_argument(
        "--costs",
        type=Path,
        default=Path("docs/engine-costs-2021.json"),
        help="the engine's measured costs (bench/engine_costs.py --out)",
    )
    ap.add_argument("--scheduling-policy", choices=("priority", "fcfs"), default="priority")
    ap.add_argument("--jobs", type=int, default=None, help="processes for the simulations")
    args = ap.parse_args()
    policies = args.policy or list(DEFAULT_POLICIES)
    if "none" not in policies:
        policies = ["none", *policies]
    try:
        step_time = engine_costs.step_time(json.loads(args.costs.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        ap.error(f"--costs {args.costs}: {exc}")

    rows: dict[str, list[tuple[float, float, float, int]]] = {p: [] for p in policies}
    for n, seed in enumerate(args.seeds, 1):
        print(f"seed {seed} ({n}/{len(args.seeds)}) ...", flush=True)
        sims = simulate(
            [args.regime], policies, seed, args.pace, args.jobs, args.scheduling_policy, step_time
        )
        none = sims[(args.regime, "none")].makespan_s
        for policy in policies:
            s = sims[(args.regime, policy)]
            minutes = s.makespan_s / 60.0
            rows[policy].append(
                (
                    s.makespan_s / none,
                    s.window_changes / minutes,
                    s.window_changes / max(1, s.finished_agents),
                    s.max_pauses,
                )
            )

    print(
        f"\n{args.regime}, pace x{args.pace}, seeds {args.seeds[0]}-{args.seeds[-1]}, "
        f"{args.scheduling_policy} scheduler, costs {args.costs.name} (means over seeds)\n"
    )
    head = ("policy", "makespan vs no control", "window changes /min", "per finished agent")
    print("| " + " | ".join((*head, "max pauses/agent")) + " |")
    print("| --- | --- | --- | --- | --- |")
    for policy, got in rows.items():
        ratio, per_min, per_agent, pauses = zip(*got, strict=True)
        print(
            f"| {policy} | {statistics.fmean(ratio):.3f} | {statistics.fmean(per_min):.1f} "
            f"| {statistics.fmean(per_agent):.2f} | {max(pauses)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
