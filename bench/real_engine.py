"""Admission policies side by side in front of a real vLLM server (its CPU build).

    .venv-vllm/bin/python bench/real_engine.py [--regime tool-bound ...] [--policy SPEC ...]
        [--repeats 3] [--thunderagent PATH] [--restart] [--calibrate | --costs FILE]
        [--pace FACTOR] [--out out/real-engine]

One real vLLM 0.32 server (``concur.sim.realvllm``: the tiny model made on this
machine, a KV cache of ``--kv-blocks`` x 128 tokens, 32,768 by default) serves
every run. Each run replays one regime's trace (``concur.sim.generate``:
``tool-bound``, ``engine-bound``, ``staggered``) with ``concur swarm``'s client at
speed 1 through one front:

* ``none``: straight to vLLM (no control);
* a concur policy spec (``aimd``, ``static:4``, ...): ``concur serve --policy SPEC``
  with its defaults otherwise, started for the run; ``SPEC+KEY=VALUE`` sets one of the
  policy's parameters too (``aimd+busy_low=0.6``: ``--set policy.aimd.busy_low=0.6``);
* ``thunderagent``: ThunderAgent (``--thunderagent PATH``, a checkout of its public
  repository, installed into its own venv on first use) with ``--router tr --metrics
  --backend-type vllm``; the swarm adds ``program_id`` to each body and releases the
  program when the agent ends.

vLLM runs with ``--scheduling-policy priority`` (``--scheduling-policy fcfs``: its
default): concur stamps each agent step with the steps its agent has done
(``admission.engine_priority``), which that scheduler serves lowest first; the other
fronts send no priority, and a scheduler that sees none serves first come first served.

Cold engine per run: before each run vLLM's prefix cache is emptied with
``POST /reset_prefix_cache`` (dev mode), which frees every cached block; nothing
else of a finished run stays in the engine (no request is left running, counters
are read as differences). ``--restart`` restarts the server instead (35-60 s more
per run). Runs go round-robin over the policies, repeat after repeat, so that each
policy sees the machine in the same states.

The regimes are named for the engine they were set on (``cpu-tiny``'s fit): tool-bound
means tool pauses long against the engine's time per step. The CPU engine's speed
drifts with the VM's host (its prefill 2.3x slower on some days), and a slower
engine turns the same trace engine-bound. Every run first times a cold prefill of
8,192 tokens against ``cpu-tiny``'s fit and prints the ratio; ``--pace FACTOR``
multiplies every tool pause and arrival time by FACTOR (``auto``: that ratio) so a
regime keeps its meaning on the day.

Per run: makespan, output tokens/s, vLLM's prefix hit rate and preemptions (its
``/metrics`` counters before and after), mean and p99 agent completion time, and
for concur the window over time, its window changes per minute and the most
pauses any one agent took (from concur's JSON log). Writes ``runs.json``,
``summary.md`` and ``window-<regime>.png`` under ``--out``; prints the table and
the control-law targets (medians over repeats).

Then holds the simulator to the runs: ``concur sim`` with the ``cpu-tiny`` preset on
the same traces, and with ``--calibrate`` (the engine's costs measured first on the
same server, as ``bench/engine_costs.py`` does) or ``--costs FILE`` also with the step
time refitted on the day: makespans within 15% and the same ranking wherever the real
runs tell two policies apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import engine_costs
import httpx
from _proc import loadavg, machine, pin_away_from_the_model

from concur.adapters.signal import EngineSignal
from concur.adapters.vllm import parse as parse_vllm
from concur.config import parse_set_value
from concur.policies.registry import PolicySettings
from concur.sim.demo.orchestrate import start_engine
from concur.sim.engine_config import PRESETS as ENGINE_PRESETS
from concur.sim.generate import generate, get_shape
from concur.sim.procs import Child, Supervisor, free_port, wait_http
from concur.sim.realvllm import VllmServer, VllmServerConfig, make_model
from concur.sim.scheduler import SchedulingPolicy
from concur.sim.server.tokenizer import filler_text
from concur.sim.steptime import MeasuredStepTime
from concur.sim.swarm.client import SwarmOptions, run_swarm
from concur.sim.trace import Trace

REGIMES = ("tool-bound", "engine-bound", "staggered")
PROBE_TOKENS = 8192
"""The cold prefill timed against ``cpu-tiny``'s fit before the runs."""
DEFAULT_POLICIES = ("none", "static:2", "static:4", "static:6", "static:8", "aimd")
SAMPLE_S = 0.5
ENGINES = {"vllm": "vLLM 0.32.0 CPU build", "sim": "concur engine --preset cpu-tiny"}


@dataclass
class Run:
    """One replay through one front."""

    regime: str
    policy: str
    repeat: int
    makespan_s: float = math.nan
    output_tok_per_s: float = math.nan
    hit_rate: float = math.nan
    preemptions: float = math.nan
    mean_completion_s: float = math.nan
    p99_completion_s: float = math.nan
    finished: int = 0
    agents: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    window_changes: int | None = None
    window_changes_per_min: float | None = None
    max_pauses_per_agent: int | None = None
    pauses: int | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    """``{t, window, live, paused, queued}`` every 0.5 s (concur and ThunderAgent)."""
    wall_s: float = 0.0
    pace: float = 1.0
    """The factor the trace's tool pauses and arrival times were multiplied by."""
    scheduler: str = "fcfs"
    """vLLM's ``--scheduling-policy`` (a runs.json written before this field: fcfs)."""


# ---------------------------------------------------------------- engine metrics


def scrape(server: Engine) -> EngineSignal:
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        return parse_vllm(http.get(server.url + "/metrics").text, time.monotonic())


def _delta(after: float | None, before: float | None) -> float:
    return math.nan if after is None or before is None else after - before


# --------------------------------------------------------------------- engines


@dataclass(frozen=True)
class SimEngineConfig:
    served_model_name: str
    kv_tokens: int
    scheduling_policy: SchedulingPolicy = "fcfs"


class SimEngine:
    """``concur engine --preset cpu-tiny`` in real time: the simulated twin of the real
    engine, for peers side by side on it (``--engine sim``). Emptying its prefix cache
    restarts it (a fresh process is a cold engine, counters from zero)."""

    def __init__(
        self, sup: Supervisor, kv_tokens: int, scheduling_policy: SchedulingPolicy
    ) -> None:
        self.sup = sup
        self.config = SimEngineConfig("concur-sim/cpu-tiny", kv_tokens, scheduling_policy)
        self.child: Child | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> SimEngine:
        args = ["--preset", "cpu-tiny", "--kv-tokens", str(self.config.kv_tokens)]
        args += ["--scheduling-policy", self.config.scheduling_policy]
        args += ["--port", str(self.port), "--log-level", "warning"]
        self.child, _ = start_engine(self.sup, "concur-engine", args)
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.sup.stop(self.child)
        self.child = None

    def reset_prefix_cache(self) -> bool:
        self.stop()
        self.start()
        return True


Engine = VllmServer | SimEngine


# ---------------------------------------------------------------------- fronts


def thunderagent_python(checkout: Path, venv: Path) -> str:
    """A venv with ThunderAgent installed from ``checkout`` (made on first use)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing ThunderAgent from {checkout} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-e", str(checkout)], check=True
        )
    return str(python)


class Fronts:
    """Starts the front of a run in front of ``upstream`` and stops it afterwards."""

    def __init__(self, sup: Supervisor, upstream: str, ta_python: str | None) -> None:
        self.sup = sup
        self.upstream = upstream
        self.ta_python = ta_python

    def start(self, policy: str, name: str) -> tuple[Child | None, str]:
        if policy == "none":
            return None, self.upstream
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if policy == "thunderagent":
            if self.ta_python is None:
                raise SystemExit("policy 'thunderagent' needs --thunderagent PATH")
            argv = [
                self.ta_python,
                "-m",
                "ThunderAgent",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backends",
                self.upstream,
                "--router",
                "tr",
                "--metrics",
                "--backend-type",
                "vllm",
                "--log-level",
                "warning",
            ]
            child = self.sup.start(name, argv)
            wait_http(child, url + "/health", timeout=60.0)
            return child, url
        spec, settings = policy_variant(policy)
        argv = [
            sys.executable,
            "-m",
            "concur",
            "serve",
            "--upstream",
            self.upstream,
            "--listen",
            f"127.0.0.1:{port}",
            "--policy",
            spec,
            "--log-format",
            "json",
        ]
        for key, raw in settings.items():  # aimd+busy_low=0.6: --set policy.aimd.busy_low=0.6
            argv += ["--set", f"policy.{spec.split(':')[0]}.{key}={raw}"]
        child = self.sup.start(name, argv)
        wait_http(child, url + "/readyz", timeout=60.0)
        return child, url


async def sample(policy: str, url: str, out: list[dict[str, Any]], t0: float) -> None:
    """Poll the front's state every :data:`SAMPLE_S` seconds until cancelled."""
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
        while True:
            try:
                if policy == "thunderagent":
                    h = (await http.get(url + "/health")).json()
                    row = {
                        "window": None,
                        "live": h["reasoning_count"] + h["acting_count"],
                        "paused": h["paused_count"],
                        "queued": 0,
                    }
                else:
                    s = (await http.get(url + "/concur/status")).json()
                    row = {k: s[k] for k in ("window", "live", "paused", "queued")}
                out.append({"t": round(time.monotonic() - t0, 2), **row})
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(SAMPLE_S)


def read_concur_log(path: Path, t0_wall: float) -> tuple[list[tuple[float, int | None]], Counter]:
    """Window changes (seconds from ``t0_wall``, new window) and pauses per agent."""
    changes: list[tuple[float, int | None]] = []
    pauses: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ts = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        t = ts.timestamp() - t0_wall
        if rec.get("event") == "window":
            changes.append((t, rec.get("after")))
        elif rec.get("event") == "admission" and rec.get("outcome") == "paused":
            pauses[rec["agent"]] += 1
    return changes, pauses


# ------------------------------------------------------------------------ runs


def regime_trace(regime: str, seed: int, pace: float) -> Trace:
    """The regime's trace with its tool pauses and arrival times multiplied by ``pace``
    (the draws are the same: a log-normal pause scales with its median)."""
    shape = get_shape(regime)
    return generate(
        regime,
        seed,
        tool_latency_median_s=shape.tool_latency_median_s * pace,
        arrival_window_s=shape.arrival_window_s * pace,
    )


def probe_speed(url: str, tokens: int = PROBE_TOKENS) -> float:
    """How much slower than ``cpu-tiny``'s fit this engine prefills: a cold prompt of
    ``tokens`` timed at the client against the fit's prediction (its
    chunked-prefill steps and the request overheads)."""
    preset = ENGINE_PRESETS["cpu-tiny"]
    with httpx.Client(trust_env=False, timeout=600.0) as http:
        engine_costs.reset(http, url)
        real, usage = engine_costs.chat(http, url, filler_text(tokens, "pace-probe"))
        engine_costs.reset(http, url)
    prompt = int(usage["prompt_tokens"])
    predicted = preset.request_overhead_s + preset.overhead_per_prompt_token_s * prompt
    for new, before in engine_costs.chunks(prompt, 0):
        chunk_pairs = int(engine_costs.pairs(new, before))
        predicted += preset.step_time.duration(new, before + new, chunk_pairs, before + new, 1)
    factor = real / predicted
    print(
        f"  a cold prefill of {prompt:,} tokens: {1000 * real:.0f} ms, cpu-tiny's fit "
        f"{1000 * predicted:.0f} ms: this engine is {factor:.2f}x as slow",
        flush=True,
    )
    return factor


def one_run(
    server: Engine, fronts: Fronts, trace: Trace, regime: str, policy: str, repeat: int
) -> Run:
    run = Run(regime, policy, repeat, agents=len(trace.agents))
    if not server.reset_prefix_cache():
        raise SystemExit("vLLM refused /reset_prefix_cache (requests still running?)")
    before = scrape(server)
    name = f"{regime}-{policy.replace(':', '_')}-{repeat}"
    child, url = fronts.start(policy, name)
    thunder = policy == "thunderagent"
    options = SwarmOptions(
        base_url=url + "/v1",
        model=server.config.served_model_name,
        read_timeout_s=1800.0,
        agent_field="program_id" if thunder else None,
        release_path="/programs/release" if thunder else None,
    )
    t0, t0_wall = time.monotonic(), time.time()

    async def go() -> Any:
        sampler = None
        if child is not None:
            sampler = asyncio.create_task(sample(policy, url, run.samples, t0))
        try:
            return await run_swarm(trace, options)
        finally:
            if sampler is not None:
                sampler.cancel()

    result = asyncio.run(go())
    run.wall_s = time.monotonic() - t0
    if child is not None:
        fronts.sup.stop(child)
        if not thunder:
            changes, pauses = read_concur_log(child.log_path, t0_wall)
            run.window_changes = len(changes)
            run.pauses = sum(pauses.values())
            run.max_pauses_per_agent = max(pauses.values(), default=0)
    after = scrape(server)
    s = result.summary
    run.makespan_s = s.makespan_s
    run.output_tok_per_s = s.output_tok_per_s
    run.mean_completion_s = s.mean_completion_s
    run.p99_completion_s = s.p99_completion_s
    run.finished = s.finished_agents
    run.errors = dict(s.errors)
    queries = _delta(after.prefix_queries_total, before.prefix_queries_total)
    hits = _delta(after.prefix_hits_total, before.prefix_hits_total)
    run.hit_rate = hits / queries if queries else math.nan
    run.preemptions = _delta(after.preemptions_total, before.preemptions_total)
    if run.window_changes is not None and run.makespan_s > 0:
        run.window_changes_per_min = run.window_changes / (run.makespan_s / 60.0)
    return run


# --------------------------------------------------------------------- report


def med(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def summarize(runs: list[Run], regime: str, policies: list[str]) -> list[str]:
    rows = [r for r in runs if r.regime == regime]
    base = med([r.makespan_s for r in rows if r.policy == "none"])
    lines = [
        f"**{regime}**",
        "",
        "| policy | makespan s (median; runs) | vs no control | output tok/s | hit rate "
        "| preemptions | mean / p99 agent s | window changes /min (/agent) | max pauses/agent |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for policy in policies:
        mine = [r for r in rows if r.policy == policy]
        if not mine:
            continue
        ms = med([r.makespan_s for r in mine])
        each = ", ".join(f"{r.makespan_s:.1f}" for r in mine)
        failed = sum(r.agents - r.finished for r in mine)
        wc = [r.window_changes_per_min for r in mine if r.window_changes_per_min is not None]
        # Per agent: the window follows the agents coming and going, so a swarm whose
        # agents finish every few seconds moves it that often (see docs/real-engine.md).
        wa = [r.window_changes / r.agents for r in mine if r.window_changes is not None]
        mp = [r.max_pauses_per_agent for r in mine if r.max_pauses_per_agent is not None]
        lines.append(
            f"| {policy} | **{ms:.1f}** ({each}){f' {failed} agents failed' if failed else ''} "
            f"| {base / ms:.2f}x | {med([r.output_tok_per_s for r in mine]):.0f} "
            f"| {100 * med([r.hit_rate for r in mine]):.0f}% "
            f"| {med([r.preemptions for r in mine]):.0f} "
            f"| {med([r.mean_completion_s for r in mine]):.1f} / "
            f"{med([r.p99_completion_s for r in mine]):.1f} "
            f"| {f'{med(wc):.1f} ({med(wa):.1f})' if wc else '-'} | {max(mp) if mp else '-'} |"
        )
    return [*lines, ""]


def targets(runs: list[Run], regime: str, default: str = "aimd") -> list[str]:
    """The control law's goal for one regime, as PASS/MISS lines."""
    rows = [r for r in runs if r.regime == regime]

    def m(policy: str) -> float:
        return med([r.makespan_s for r in rows if r.policy == policy])

    caps = {r.policy for r in rows if r.policy.startswith("static:")}
    out = []
    d, none = m(default), m("none")
    if math.isnan(d) or math.isnan(none):
        return out
    out.append(
        _line(
            d / none <= 1.02,
            f"{regime}: {default} {d:.1f} s vs no control {none:.1f} s = {d / none:.3f}x (<= 1.02)",
        )
    )
    if caps:
        best = min(caps, key=m)
        b = m(best)
        out.append(
            _line(
                d / b <= 1.03,
                f"{regime}: {default} vs best fixed cap {best} {b:.1f} s = {d / b:.3f}x (<= 1.03)",
            )
        )
        if none / b >= 1.2:
            out.append(
                _line(
                    none / d >= 1.2,
                    f"{regime}: caps beat no control by "
                    f"{none / b:.2f}x; {default} by {none / d:.2f}x (>= 1.2)",
                )
            )
    ta = [r for r in rows if r.policy == "thunderagent"]
    mine = [r for r in rows if r.policy == default]
    if ta and mine:
        worst = max(r.makespan_s for r in mine)
        best_ta = min(r.makespan_s for r in ta)
        # Where the runs spread as widely as the fronts differ, how often a run of one
        # beats a run of the other says more than the two extremes.
        won = sum(a.makespan_s < b.makespan_s for a in mine for b in ta)
        out.append(
            _line(
                worst < best_ta,
                f"{regime}: {default}'s slowest run {worst:.1f} s vs "
                f"ThunderAgent's fastest {best_ta:.1f} s (every run faster; "
                f"faster in {won} of {len(mine) * len(ta)} pairs of runs)",
            )
        )
    return out


def simulate(
    regimes: list[str],
    policies: list[str],
    seed: int,
    pace: float,
    jobs: int | None,
    scheduling_policy: SchedulingPolicy,
    step_time: MeasuredStepTime | None = None,
) -> dict:
    """``concur sim`` with the measured preset on the same traces (its step time refitted,
    given ``step_time``): {(regime, policy): Summary}."""
    from concur.sim.batch import Job, run_jobs
    from concur.sim.engine_config import EngineSpec

    engine = EngineSpec.from_preset(
        "cpu-tiny", step_time=step_time, scheduling_policy=scheduling_policy
    )
    todo = []
    for regime in regimes:
        trace = regime_trace(regime, seed, pace)
        for policy in policies:
            if policy == "thunderagent":
                continue
            spec, settings = sim_policy(policy)
            todo.append(
                Job(
                    label=f"{regime}|{policy}",
                    spec=spec,
                    trace=trace,
                    engine=engine,
                    settings=settings,
                )
            )
    results = run_jobs(todo, workers=jobs)
    return {tuple(j.label.split("|")): r.summary for j, r in zip(todo, results, strict=True)}


def policy_variant(policy: str) -> tuple[str, dict[str, str]]:
    """``SPEC+KEY=VALUE+...`` -> the policy spec and its parameters' raw values."""
    spec, *items = policy.split("+")
    parts = (item.partition("=") for item in items)
    return spec, {key: raw for key, _, raw in parts}


def sim_policy(policy: str) -> tuple[str, PolicySettings]:
    """A front's policy as ``concur sim`` takes it: ``none`` is ``unlimited``, and
    ``SPEC+KEY=VALUE`` sets the policy's parameters, each value read as ``--set`` reads
    it for the proxy."""
    if policy == "none":
        return "unlimited", PolicySettings()
    spec, settings = policy_variant(policy)
    values = {key: parse_set_value(raw) for key, raw in settings.items()}
    return spec, PolicySettings.model_validate({spec.split(":")[0]: values} if values else {})


def fidelity(
    runs: list[Run], sims: dict, regime: str, policies: list[str], label: str = "preset cpu-tiny"
) -> list[str]:
    """Simulated vs real makespans of one regime, and whether both rank the policies alike."""
    real = {
        p: med([r.makespan_s for r in runs if r.regime == regime and r.policy == p])
        for p in policies
        if (regime, p) in sims
    }
    real = {p: v for p, v in real.items() if not math.isnan(v)}
    if not real:
        return []
    lines = [
        f"**{regime}**: simulated ({label}) vs real",
        "",
        "| policy | real s | simulated s | ratio | real hits | sim hits |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    worst = 0.0
    for p, v in real.items():
        sim = sims[(regime, p)]
        ratio = sim.makespan_s / v
        worst = max(worst, abs(ratio - 1.0))
        hits = med([r.hit_rate for r in runs if r.regime == regime and r.policy == p])
        lines.append(
            f"| {p} | {v:.1f} | {sim.makespan_s:.1f} | {ratio:.3f} | {100 * hits:.0f}% "
            f"| {100 * sim.prefix_hit_rate:.0f}% |"
        )
    by_real = sorted(real, key=real.__getitem__)
    by_sim = sorted(real, key=lambda p: sims[(regime, p)].makespan_s)
    spans = {p: [r.makespan_s for r in runs if r.regime == regime and r.policy == p] for p in real}
    # A pair counts as ranked by the real engine only when every run of the faster one beat
    # every run of the slower one; closer pairs are within its run-to-run spread.
    swaps, ties = [], []
    for i, a in enumerate(by_real):
        for b in by_real[i + 1 :]:
            if by_sim.index(a) > by_sim.index(b):
                apart = max(spans[a]) < min(spans[b])
                (swaps if apart else ties).append(
                    f"{a}/{b} (real {real[a]:.1f} vs {real[b]:.1f} s)"
                )
    ranking = f"{regime}: same ranking where the real runs tell the policies apart"
    if swaps:
        ranking += f"; swapped: {', '.join(swaps)}"
    if ties:
        ranking += f"; swapped within the spread of the real runs: {', '.join(ties)}"
    lines += [
        "",
        _line(worst <= 0.15, f"{regime}: every policy within {100 * worst:.1f}% (<= 15%)"),
        _line(not swaps, ranking),
        "",
    ]
    return lines


def _line(ok: bool, text: str) -> str:
    return f"[{'PASS' if ok else 'MISS'}] {text}"


def plot(runs: list[Run], regime: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r.regime == regime and r.samples]
    policies = sorted({r.policy for r in rows})
    if not policies:
        return
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for i, policy in enumerate(policies):
        mine = sorted((r for r in rows if r.policy == policy), key=lambda r: r.makespan_s)
        r = mine[len(mine) // 2]  # the median run
        t = [s["t"] for s in r.samples]
        color = f"C{i}"
        win = [s["window"] for s in r.samples]
        if any(w is not None for w in win):
            axes[0].step(
                t,
                [math.nan if w is None else w for w in win],
                where="post",
                color=color,
                label=f"{policy} ({r.makespan_s:.0f} s)",
            )
        axes[1].plot(t, [s["live"] for s in r.samples], color=color, label=policy)
        axes[2].plot(t, [s["paused"] + s["queued"] for s in r.samples], color=color)
    axes[0].set_ylabel("window")
    axes[1].set_ylabel("live agents")
    axes[2].set_ylabel("paused + queued")
    axes[2].set_xlabel("seconds")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{regime}: concur's window and agents over time (median run of each)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------ main


def measure(
    args: argparse.Namespace, regimes: list[str], policies: list[str], ta_python: str | None
) -> list[Run]:
    """Every run, in round-robin order, against one vLLM server."""
    print(
        f"real_engine: {platform.node()}, {machine()}, regimes {', '.join(regimes)}, "
        f"policies {', '.join(policies)}, {args.repeats} repeats, load {loadavg()}",
        flush=True,
    )
    runs: list[Run] = []
    with Supervisor(args.out / "logs") as sup:
        server: Engine
        if args.engine == "sim":
            server = SimEngine(sup, args.kv_blocks * 128, args.scheduling_policy).start()
        else:
            config = VllmServerConfig(
                model=make_model(),
                kv_blocks=args.kv_blocks,
                scheduling_policy=args.scheduling_policy,
            )
            server = VllmServer(config, log_path=args.out / "vllm.log").start()
            print(f"  {pin_away_from_the_model(server.child.pid)}", flush=True)
            if args.calibrate:
                print("  the engine's costs today (bench/engine_costs.py):", flush=True)
                costs = engine_costs.measure(server.url, repeats=3)
                args.costs = args.out / "engine-costs.json"
                args.costs.write_text(json.dumps(costs, indent=1))
        # The twin runs at the fit's speed by construction.
        speed = probe_speed(server.url) if isinstance(server, VllmServer) else 1.0
        if args.pace == "auto":
            args.pace = round(max(1.0, speed), 2)
        args.pace = float(args.pace)
        if args.pace != 1.0:
            print(f"  tool pauses and arrivals x{args.pace:g} (--pace)", flush=True)
        elif speed > 1.2:
            print(
                f"  the regimes were set on an engine {speed:.2f}x as fast: --pace auto keeps "
                "tool-bound tool-bound",
                flush=True,
            )
        fronts = Fronts(sup, server.url, ta_python)
        try:
            for regime in regimes:
                trace = regime_trace(regime, args.seed, args.pace)
                for k in range(args.repeats):
                    order = policies[k % len(policies) :] + policies[: k % len(policies)]
                    for policy in order:
                        if args.restart and runs and isinstance(server, VllmServer):
                            server.stop()
                            os.sched_setaffinity(0, range(os.cpu_count() or 1))
                            server = VllmServer(config, log_path=args.out / "vllm.log")
                            server.start()
                            pin_away_from_the_model(server.child.pid)
                            fronts.upstream = server.url
                        run = one_run(server, fronts, trace, regime, policy, k)
                        run.pace = args.pace
                        run.scheduler = server.config.scheduling_policy
                        runs.append(run)
                        print(
                            f"  {regime:<13} {policy:<14} #{k}  makespan {run.makespan_s:7.1f} s"
                            f"  hits {100 * run.hit_rate:5.1f}%  preempt {run.preemptions:4.0f}"
                            f"  finished {run.finished}/{run.agents}"
                            + (
                                f"  window changes {run.window_changes}"
                                if run.window_changes is not None
                                else ""
                            )
                            + (
                                f"  max pauses {run.max_pauses_per_agent}"
                                if run.max_pauses_per_agent is not None
                                else ""
                            ),
                            flush=True,
                        )
                        (args.out / "runs.json").write_text(
                            json.dumps([asdict(r) for r in runs], indent=1)
                        )
        finally:
            server.stop()
    return runs


def _pace(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", action="append", choices=REGIMES, help="default: all three")
    ap.add_argument("--policy", action="append", help=f"default: {' '.join(DEFAULT_POLICIES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, default=256, help="KV cache in 128-token blocks")
    ap.add_argument("--thunderagent", type=Path, default=None, help="ThunderAgent checkout")
    ap.add_argument("--restart", action="store_true", help="restart vLLM before every run")
    ap.add_argument(
        "--engine",
        choices=("vllm", "sim"),
        default="vllm",
        help="the real vLLM, or its simulated twin (concur engine --preset cpu-tiny)",
    )
    ap.add_argument(
        "--pace",
        default="1",
        type=_pace,
        metavar="FACTOR|auto",
        help="multiply tool pauses and arrival times by FACTOR; auto: by how much slower "
        "than cpu-tiny's fit this engine prefills (the probe printed first), at least 1",
    )
    ap.add_argument(
        "--scheduling-policy",
        choices=("priority", "fcfs"),
        default="priority",
        help="vLLM's scheduler for every front (default priority: concur's agent steps carry "
        "a priority, fewest steps first; the other fronts send none, which serves them "
        "first come first served)",
    )
    ap.add_argument("--out", type=Path, default=Path("out/real-engine"))
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RUNS_JSON",
        help="no runs: report (and simulate) from a runs.json an earlier run wrote",
    )
    ap.add_argument("--jobs", type=int, default=None, help="processes for the simulations")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the engine's costs first (bench/engine_costs.py, ~6 min) and hold the "
        "simulator to the runs with that step time too",
    )
    ap.add_argument(
        "--costs",
        type=Path,
        default=None,
        metavar="COSTS_JSON",
        help="hold the simulator to the runs with this step time too (engine_costs.py --out)",
    )
    args = ap.parse_args()
    if args.calibrate and (args.engine != "vllm" or args.report is not None):
        ap.error(
            "--calibrate measures the real engine before runs on it: not with --engine "
            "sim or --report (give --costs FILE instead)"
        )
    regimes = args.regime or list(REGIMES)
    policies = args.policy or list(DEFAULT_POLICIES)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        runs = [Run(**r) for r in json.loads(args.report.read_text())]
        regimes = [g for g in regimes if any(r.regime == g for r in runs)]
        policies = list(dict.fromkeys(r.policy for r in runs))
        started = datetime.fromtimestamp(args.report.stat().st_mtime, UTC)
        repeats = max((r.repeat + 1 for r in runs), default=0)
        args.pace = runs[0].pace if runs else 1.0
        args.scheduling_policy = runs[0].scheduler if runs else "fcfs"
    else:
        if args.thunderagent is not None and "thunderagent" not in policies:
            policies.append("thunderagent")
        ta_python = None
        if "thunderagent" in policies:
            if args.thunderagent is None:
                ap.error("policy thunderagent needs --thunderagent PATH (a checkout)")
            ta_python = thunderagent_python(args.thunderagent, args.out / ".venv-thunderagent")
        started = datetime.now(UTC)
        runs = measure(args, regimes, policies, ta_python)
        repeats = args.repeats
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine()} ({platform.node()}), "
        f"{ENGINES[args.engine]}"
        + f" (--scheduling-policy {args.scheduling_policy})"
        + f", KV cache {args.kv_blocks * 128:,} tokens, "
        f"{repeats} repeats, load at the end {loadavg()}"
        + (f", tool pauses and arrivals x{args.pace:g}." if args.pace != 1.0 else "."),
        "",
    ]
    verdicts: list[str] = []
    for regime in regimes:
        lines += summarize(runs, regime, policies)
        verdicts += targets(runs, regime)
        plot(runs, regime, args.out / f"window-{regime}.png")
    lines += ["```", *verdicts, "```", ""]
    sched = args.scheduling_policy
    sims = simulate(regimes, policies, args.seed, args.pace, args.jobs, sched)
    for regime in regimes:
        lines += fidelity(runs, sims, regime, policies)
    if args.costs is not None:
        # The same, with the step time measured again on the day (the CPU engine's speed
        # drifts with the VM's host: a stale fit is off by its drift, not by the model).
        costs = json.loads(args.costs.read_text())
        refit = simulate(
            regimes, policies, args.seed, args.pace, args.jobs, sched, engine_costs.step_time(costs)
        )
        label = f"cpu-tiny, step time refitted {costs.get('measured', args.costs.name)}"
        for regime in regimes:
            lines += fidelity(runs, refit, regime, policies, label)
    text = "\n".join(lines)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
