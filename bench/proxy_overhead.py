"""Proxy overhead: concur vs a direct connection vs a bare aiohttp pass-through, side by side.

    .venv/bin/python bench/proxy_overhead.py [--clients 1,64,256] [--duration 1.5]
        [--repeats 4] [--queued 1000] [--litellm /tmp/litellm-venv/bin/litellm]
        [--framers httptools,aiohttp] [--baseline-python /tmp/before/.venv/bin/python]
        [--profile-concur out.prof]

One run starts, each in its own process on loopback: a fast fake upstream
(``_fast_upstream.py``: 16 SSE chunks + usage + [DONE], no delay), ``concur serve``
(``--policy unlimited`` with each response framer, ``upstream.framing``: its own
parser as ``concur (unlimited)``, and ``concur (httptools)`` and
``concur (aiohttp parser)``; and the default ``aimd`` with a window of 1024 so no
client queues), the bare pass-through (``_bare_proxy.py``) with aiohttp and with
httpx as its upstream client, with ``--baseline-python`` another build of concur
(``concur (before)``: that interpreter's ``python -m concur``, e.g. a venv with the
previous commit installed), and, with ``--litellm``, LiteLLM's proxy (one worker).
This process is the load (``_load.py``): N streaming clients, the same client for
every path, each with its own agent id. Per path and client count it reports time
to first byte (p50, p99), streams per second and the proxy's CPU and RSS (from
/proc), then checks issue 3's targets as ratios measured side by side
(``_report.py``), then each framer (and the baseline build) against concur's own
parser as per-repeat ratios of CPU per stream and throughput, naming a winner only
when every repeat agrees, and last what 1,000 queued agents held open cost concur in
RSS (``--policy static:1``: one agent holds the only slot, 1,000 new agents wait).

A baseline build, e.g. the commit before a change, in a venv of its own:

    mkdir /tmp/before && git archive COMMIT | tar -x -C /tmp/before
    python3 -m venv /tmp/before/.venv && /tmp/before/.venv/bin/pip install -q /tmp/before

Client, upstream and proxy share this machine's cores, which is why the bare
pass-through, not the direct path, is the floor to compare with. Every repeat runs
all paths back to back (order rotated); tables show medians over repeats and the
targets are judged on per-repeat ratios. ``--profile-concur`` runs the unlimited
concur under cProfile (CPU clock, recording only in the measured windows) and
prints its hottest functions; that column is then slower than normal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _load import AGENT_HEADER, API_KEY, CHAT_PATH, JSON_HEADERS, LoadClient, run_case
from _proc import Proc, free_port, loadavg, machine
from _report import (
    Cases,
    aggregate,
    check_queued,
    check_targets,
    compare_paths,
    cpu_table,
    markdown_table,
)

HERE = Path(__file__).resolve().parent
PY = sys.executable
BARE = "bare aiohttp"
OWN = "concur (unlimited)"
"""concur with its own response parser: what each framer and the baseline are held against."""
FRAMED = {"httptools": "concur (httptools)", "aiohttp": "concur (aiohttp parser)"}
"""The path of concur (unlimited) with each other ``upstream.framing``."""
BEFORE = "concur (before)"


@dataclass
class Target:
    """One path under test: its base URL and the proxy process in between (None: direct)."""

    name: str
    url: str
    proc: Proc | None = None


# ---------------------------------------------------------------- processes


def upstream_proc(logs: Path) -> Proc:
    port = free_port()
    return Proc(
        "upstream",
        [PY, str(HERE / "_fast_upstream.py"), "--port", str(port)],
        f"http://127.0.0.1:{port}",
        log_path=logs / "upstream.log",
    )


def bare_proc(upstream: str, client: str, logs: Path) -> Proc:
    port = free_port()
    script = str(HERE / "_bare_proxy.py")
    return Proc(
        f"bare {client}",
        [PY, script, "--upstream", upstream, "--port", str(port), "--client", client],
        f"http://127.0.0.1:{port}",
        log_path=logs / f"bare-{client}.log",
    )


def concur_proc(
    name: str,
    upstream: str,
    policy: str,
    logs: Path,
    extra: Sequence[str] = (),
    profile: str = "",
    python: str = PY,
    tag: str = "",
) -> Proc:
    """``concur serve`` (``python -m concur``); ``tag`` tells its log from another's."""
    port = free_port()
    if profile:
        head = [python, str(HERE / "_profiled.py"), profile, "concur"]
    else:
        # -P: the interpreter's own install of concur, never the one in the current
        # directory (a baseline build would otherwise run this checkout's code).
        head = [python, "-P", "-m", "concur"]
    listen = f"127.0.0.1:{port}"
    return Proc(
        name,
        [*head, "serve", "--upstream", upstream, "--listen", listen, "--policy", policy, *extra],
        f"http://{listen}",
        ready_path="/readyz",
        log_path=logs / f"concur-{policy.replace(':', '-')}{tag}.log",
        env={"PROFILE_ON_SIGNAL": "1"} if profile else None,
        profiled=bool(profile),
    )


def litellm_proc(binary: str, upstream: str, logs: Path) -> Proc:
    port = free_port()
    config = logs / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench-model\n"
        "    litellm_params:\n"
        "      model: hosted_vllm/bench-model\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-unused\n"
    )
    argv = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return Proc(
        "litellm",
        [*argv, "--num_workers", "1"],
        f"http://127.0.0.1:{port}",
        ready_path="/health/liveliness",
        log_path=logs / "litellm.log",
        env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": API_KEY},
    )


# ------------------------------------------------------------- queued agents


def _queued(url: str) -> int:
    with urllib.request.urlopen(url + "/concur/status", timeout=5) as resp:
        return int(json.loads(resp.read())["queued"])


async def queued_agents_cost(concur: Proc, agents: int, client_kind: str) -> str:
    """One agent holds concur's only slot; ``agents`` more queue. What does that cost?"""
    load = LoadClient(client_kind, agents + 1)
    url = concur.url + CHAT_PATH
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[tuple[float, bool]]] = []
    try:
        _, ok = await load.stream(url, {**JSON_HEADERS, AGENT_HEADER: "holder"})
        if not ok:
            raise RuntimeError("the agent meant to hold the only slot got no complete stream")
        await asyncio.sleep(0.5)
        before, cpu0 = concur.rss_mib(), concur.cpu()
        tasks = [
            asyncio.create_task(load.stream(url, {**JSON_HEADERS, AGENT_HEADER: f"queued-{i}"}))
            for i in range(agents)
        ]
        deadline = loop.time() + 60
        queued = 0
        while queued < agents and loop.time() < deadline:
            await asyncio.sleep(0.2)
            queued = await asyncio.to_thread(_queued, concur.url)
        await asyncio.sleep(1.0)
        after, cpu1 = concur.rss_mib(), concur.cpu()
        await asyncio.sleep(2.0)
        held_cpu = (concur.cpu() - cpu1) / 2.0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await load.close()
    left = queued
    for _ in range(50):  # the queue must empty once the clients are gone
        left = await asyncio.to_thread(_queued, concur.url)
        if left == 0:
            break
        await asyncio.sleep(0.1)
    return (
        check_queued(agents, queued, before, after)
        + f"; CPU to queue them {cpu1 - cpu0:.2f} s, CPU while held {100 * held_cpu:.1f}% "
        f"of a core; still queued after the clients left: {left}"
    )


# -------------------------------------------------------------------- run


def print_profile(path: str, top: int) -> None:
    import pstats

    print(f"\n### cProfile of concur (unlimited) in the measured windows, CPU clock, top {top}\n")
    pstats.Stats(path).sort_stats("tottime").print_stats(top)


async def start_paths(args: argparse.Namespace, upstream: Proc, logs: Path) -> list[Target]:
    """Start the proxies under test; the paths to measure, direct first."""
    up = upstream.url
    # Its own parser named, not left to the default (httptools since it measured faster).
    own = ["--set", "upstream.framing=builtin"]
    procs = [concur_proc(OWN, up, "unlimited", logs, extra=own, profile=args.profile_concur or "")]
    for f in args.framers:
        framing = ["--set", f"upstream.framing={f}"]
        procs.append(concur_proc(FRAMED[f], up, "unlimited", logs, extra=framing, tag=f"-{f}"))
    if args.baseline_python:
        before = concur_proc(
            BEFORE, up, "unlimited", logs, python=args.baseline_python, tag="-before"
        )
        procs.append(before)
    procs += [
        concur_proc(
            "concur (aimd)", up, "aimd", logs, extra=["--set", "policy.aimd.initial_window=1024"]
        ),
        bare_proc(up, "aiohttp", logs),
        bare_proc(up, "httpx", logs),
    ]
    if args.litellm:
        procs.append(litellm_proc(args.litellm, up, logs))
    if args.only:
        procs = [p for p in procs if p.name in args.only]
    for p in procs:
        await asyncio.to_thread(p.start, 180 if p.name == "litellm" else 30)
    return [Target("direct", up), *(Target(p.name, p.url, p) for p in procs)]


async def measure(args: argparse.Namespace, logs: Path) -> int:
    upstream = upstream_proc(logs)
    targets: list[Target] = []
    try:
        upstream.start()
        targets = await start_paths(args, upstream, logs)
        print(f"machine: {machine()}; python {sys.version.split()[0]}; load {loadavg()}")
        print(f"client: {args.client}; {args.duration:g} s measured per case, x{args.repeats}")
        cases: Cases = {}
        for n in args.clients:
            for rep in range(args.repeats):
                rot = rep % len(targets)
                for t in targets[rot:] + targets[:rot]:
                    if t.name == "litellm" and rep > 0:
                        continue  # a reference column: once per client count is enough
                    s = await run_case(
                        t.name,
                        t.url,
                        t.proc,
                        upstream,
                        n,
                        warmup=args.warmup * (2 if t.name == "litellm" else 1),
                        duration=args.duration,
                        client_kind=args.client,
                    )
                    cases.setdefault((t.name, n), []).append(s)
                    print(
                        f"  {n:>4} clients  {t.name:<24} p50 {s.pct(0.5):8.2f} ms  "
                        f"p99 {s.pct(0.99):8.2f} ms  {s.rate:6.0f} streams/s  errors {s.errors}",
                        flush=True,
                    )
                    await asyncio.sleep(args.pause)
        rows = [aggregate(cases[(t.name, n)]) for n in args.clients for t in targets]
        print(f"\n### Proxy overhead ({machine()}; load at the end {loadavg()})\n")
        print(markdown_table(rows))
        print("\nCPU per stream spent by the client and the upstream:\n")
        print(cpu_table(rows))
        names = {t.name for t in targets}
        others = [p for p in [*FRAMED.values(), BEFORE] if p in names and OWN in names]
        if others:
            print(f"\n### Framing (issue 17): against {OWN}, concur's own parser\n")
            for path in others:
                print("\n".join(compare_paths(cases, path, OWN, args.clients)))
        print("\n### Targets (issue 3)\n")
        verdicts: list[str] = []
        for t in targets:
            if t.name.startswith("concur"):
                verdicts += check_targets(cases, t.name, BARE, args.clients)
        if args.queued > 0:
            for t in targets:
                if t.proc is not None:
                    t.proc.stop()
            holder = concur_proc("concur (static:1)", upstream.url, "static:1", logs)
            targets.append(Target(holder.name, holder.url, holder))
            holder.start()
            verdicts.append(await queued_agents_cost(holder, args.queued, args.client))
        print("\n".join(verdicts))
        failed = sum(v.startswith("[FAIL]") for v in verdicts)
        print(f"\n{failed} target line(s) missed" if failed else "\nall targets met")
        return 1 if failed else 0
    finally:
        for t in reversed(targets):
            if t.proc is not None:
                with contextlib.suppress(Exception):
                    t.proc.stop()
        upstream.stop()


def _clients(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected counts such as 1,64,256") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be >= 1")
    return values


def _framers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in FRAMED]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown}: the framers are {', '.join(FRAMED)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=_clients, default=[1, 64, 256], help="e.g. 1,64,256")
    ap.add_argument("--duration", type=float, default=1.5, help="measured seconds per case")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per case")
    ap.add_argument("--repeats", type=int, default=4, help="runs of every case (LiteLLM: 1)")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between cases")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    ap.add_argument("--queued", type=int, default=1000, help="agents to queue (0: skip)")
    ap.add_argument("--litellm", metavar="PATH", help="LiteLLM's `litellm` binary: add it")
    ap.add_argument(
        "--framers",
        type=_framers,
        default=list(FRAMED),
        help="other upstream.framing values to run concur (unlimited) with "
        f"(default {','.join(FRAMED)}; '' for none)",
    )
    ap.add_argument(
        "--baseline-python",
        metavar="PYTHON",
        help=f"an interpreter whose `-m concur` is another build: add it as {BEFORE!r}",
    )
    ap.add_argument(
        "--only", action="append", metavar="PATH", help="measure only this path (and direct)"
    )
    ap.add_argument("--profile-concur", metavar="OUT", help="cProfile concur (unlimited) to OUT")
    ap.add_argument("--profile-top", type=int, default=30)
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = ap.parse_args(argv)
    if args.litellm and not Path(args.litellm).is_file():
        ap.error(
            f"--litellm {args.litellm!r} is not a file; install it with: python3 -m venv "
            "/tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'"
        )
    if args.repeats < 1 or args.duration <= 0:
        ap.error("--repeats must be >= 1 and --duration > 0")
    logs = Path(tempfile.mkdtemp(prefix="concur-bench-"))
    started = time.monotonic()
    try:
        code = asyncio.run(measure(args, logs))
        if args.profile_concur and Path(args.profile_concur).exists():
            print_profile(args.profile_concur, args.profile_top)
        return code
    finally:
        print(f"\ntotal time {time.monotonic() - started:.0f} s; logs {logs}", end="")
        if not args.keep_logs:
            for f in logs.iterdir():
                f.unlink()
            logs.rmdir()
            print(" (removed)", end="")
        print()


if __name__ == "__main__":
    sys.exit(main())
