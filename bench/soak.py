"""Soak: thousands of agents through concur to the simulated engine, with hang-ups and faults.

    .venv/bin/python bench/soak.py [--agents 2000] [--steps 10] [--speed 50]
        [--disconnect 0.05] [--faults 0.02] [--arrival 20] [--budget 600] [--seed 1]
        [--json out.json]

Processes, each on its own loopback port:

    this process (the agents) -> concur serve -> faulty hop -> concur engine (simulated vLLM)
                                      \\-------- GET /metrics -------------^

``concur engine`` is the simulated vLLM server (``concur.sim.server``);
``_faulty_hop.py`` forwards everything and breaks ``--faults`` of the generation
requests (500, 503, reset before headers, stall past concur's first-byte timeout,
reset mid-body) and remembers which. Every agent runs ``--steps`` chat completions
(half of them streaming) whose context grows step by step, with a short tool pause
between steps, the last one marked done. ``--disconnect`` of the agents hang up at
a random step, either before the answer starts or after its first bytes, and never
come back (their slot is freed by ``admission.idle_timeout``).

At the end the run checks, and prints:

* requests sent and responses by class;
* every injected fault produced exactly the answer it calls for (500/503 passed
  through as-is, reset -> 502, stall -> 504, reset mid-body -> a truncated body) and
  every other request completed (or was deliberately abandoned by its client);
* lost requests: no response and not abandoned by the client (must be 0);
* leaked slots: active + queued + in flight in ``/concur/status`` once every agent
  is gone and idle slots are reaped (must be 0);
* added latency: time to response headers seen by the client minus the engine's
  own time as the hop measured it (``X-Soak-Hop-Out - X-Soak-Hop-In``), p50/p99, for
  probe agents (``--probes`` of ``--agents`` each way) that run alongside the load
  without an agent id, through concur (``admission.anonymous = bypass``, so never
  queued) and straight to the hop: the difference is what concur adds. The main
  agents' own figures, which include admission waits, are printed too;
* concur's RSS at start, peak and end (growth must stay under 50 MiB).

Exit code 0 when lost = 0, leaked = 0, every fault was answered as expected and the
RSS growth is under 50 MiB; 1 otherwise. ``--budget`` bounds the whole run (seconds):
agents still running when it is spent are abandoned and reported.

The flood (overload protection), instead of the agents above:

    .venv/bin/python bench/soak.py --flood 3000 [--flood-body 400000]
        [--flood-window 8] [--flood-held-mib 128] [--flood-arrival 5]

``--flood-window`` agents fill the window (``static`` policy) and stay admitted while
``--flood`` new agents arrive over ``--flood-arrival`` seconds, each with one step of
``--flood-body`` bytes (padding beside a short chat), concur's held bodies bounded by
``server.max_held_bytes = --flood-held-mib``. Once every flood request is answered or
queued, the window's agents end and the queue drains. It checks, and prints: every
request answered (200, or 503 ``overloaded`` with ``Retry-After``; no connection
error, no timeout), concur responsive (``/healthz`` timed every 0.5 s throughout),
its held bytes back to 0 and no slot leaked, and its peak RSS: the growth must stay
under the budget plus ``FLOOD_RSS_SLACK_MIB`` (connections, buffers, parsing).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _faulty_hop import ERROR_BODIES
from _proc import Proc, cpu_seconds, free_port, machine, memory_kib

HERE = Path(__file__).resolve().parent
PY = sys.executable
CHAT = "/v1/chat/completions"
AGENT = "X-Concur-Agent-Id"
DONE = "X-Concur-Agent-Done"
MAX_RSS_GROWTH_MIB = 50.0
FLOOD_RSS_SLACK_MIB = 128.0
"""Flood: RSS growth allowed beyond the held-body budget (thousands of connections)."""
FIRST_BYTE_TIMEOUT = 30.0
IDLE_TIMEOUT = 5.0
EXPECTED = {
    "500": "http_500",
    "503": "http_503",
    "reset": "http_502",
    "stall": "http_504",
    "midstream": "truncated",
}
SYSTEM = (
    "You are a careful coding agent working in a large repository. Use the tools you are "
    "given, read files before editing them, and keep every change minimal. "
) * 6


@dataclass
class Result:
    """One request as its client saw it."""

    soak_id: str
    step: int
    kind: str
    """ok, http_<status>, truncated, client_disconnected, no_response, client_timeout,
    bad_body, cut_by_budget."""
    started: float
    headers_at: float | None = None
    hop_in: float | None = None
    hop_out: float | None = None
    body: bytes = b""
    error: str = ""

    @property
    def added(self) -> float | None:
        """Seconds to headers that the engine did not spend (None if unknown)."""
        if self.headers_at is None or self.hop_in is None or self.hop_out is None:
            return None
        return (self.headers_at - self.started) - (self.hop_out - self.hop_in)


@dataclass
class Load:
    """What the agents did, shared by all of them."""

    results: list[Result] = field(default_factory=list)
    direct: list[Result] = field(default_factory=list)
    """Steps of the probe agents that go straight to the hop (the latency baseline)."""
    via: list[Result] = field(default_factory=list)
    """Steps of the probe agents sent anonymously through concur (never gated)."""
    disconnect_planned: int = 0
    agents_done: int = 0
    rss_after_round: list[float] = field(default_factory=list)
    healthz: dict[str, list[float]] = field(default_factory=dict)
    """Seconds each ``GET /healthz`` (concur) and ``/soak/health`` (hop) took, polled
    from a thread of its own: each server's responsiveness, apart from the load's loop."""
    concur_cpu: float = 0.0
    """CPU seconds concur used while the load ran."""


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _content(kind_stream: bool, body: bytes) -> str | None:
    """The assistant text of a complete response, or None when it is not complete."""
    if kind_stream:
        text = body.decode("utf-8", "replace")
        if not text.rstrip().endswith("data: [DONE]"):
            return None
        parts = []
        for block in text.split("\n\n"):
            if block.startswith("data: {"):
                obj = json.loads(block[6:])
                for choice in obj.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
        return "".join(parts)
    try:
        obj = json.loads(body)
        return str(obj["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    step: int,
    hang_up: str | None,
    rng: random.Random,
) -> Result:
    """Send one step; ``hang_up``: "early" (before the answer) or "late" (after its first bytes)."""
    res = Result(headers.get("X-Soak-Id", ""), step, "no_response", time.monotonic())
    stream = bool(payload.get("stream"))

    async def run() -> None:
        async with session.post(url + CHAT, json=payload, headers=headers) as resp:
            res.headers_at = time.monotonic()
            if "X-Soak-Hop-In" in resp.headers:
                res.hop_in = float(resp.headers["X-Soak-Hop-In"])
                res.hop_out = float(resp.headers["X-Soak-Hop-Out"])
            res.kind = f"http_{resp.status}"
            body = bytearray()
            try:
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if hang_up == "late":
                        res.kind = "client_disconnected"
                        resp.close()
                        return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                res.kind, res.error = "truncated", f"{type(exc).__name__}: {exc}"
            res.body = bytes(body)
            if res.kind == "http_200" and _content(stream, res.body) is not None:
                res.kind = "ok"
            elif res.kind == "http_200":
                res.kind = "bad_body"

    task = asyncio.ensure_future(run())
    try:
        if hang_up == "early":
            await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.03))
            if not task.done():
                task.cancel()
                res.kind = "client_disconnected"
        await task
    except asyncio.CancelledError:
        if res.kind != "client_disconnected":
            raise
    except TimeoutError:
        res.kind = "client_timeout"
    except aiohttp.ClientError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        if res.headers_at is not None and res.kind.startswith("http_"):
            res.kind = "truncated"
    return res


async def agent(
    name: str,
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    load: Load,
    model: str,
    *,
    role: str = "main",
) -> None:
    """One agent's session.

    ``main`` agents carry an agent id and an ``X-Soak-Id`` (the hop may break their
    requests) and may hang up; probes do neither: ``direct`` ones go straight to the
    hop, ``via`` ones through concur without an id (bypassing the gate).
    """
    rng = random.Random(f"{args.seed}-{name}")
    await asyncio.sleep(rng.uniform(0.0, args.arrival))
    hang_step, hang_phase = None, None
    main = role == "main"
    if main and rng.random() < args.disconnect:
        hang_step, hang_phase = rng.randrange(args.steps), rng.choice(("early", "late"))
        load.disconnect_planned += 1
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    for step in range(args.steps):
        messages.append(
            {"role": "user", "content": f"Step {step} of agent {name}: run the tests. " * 4}
        )
        stream = rng.random() < 0.5
        payload = {
            "model": model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "stream": stream,
        }
        headers = {AGENT: name, "X-Soak-Id": f"{name}-{step}"} if main else {}
        if step == args.steps - 1:
            headers[DONE] = "1"
        hang = hang_phase if step == hang_step else None
        if hang == "late" and not stream:
            hang = "early"
        res = await one_request(session, url, payload, headers, step, hang, rng)
        {"main": load.results, "direct": load.direct, "via": load.via}[role].append(res)
        if res.kind == "client_disconnected":
            return  # this client is gone for good
        if res.kind == "ok":
            messages.append({"role": "assistant", "content": _content(stream, res.body) or ""})
            res.body = b""  # keep memory flat
        await asyncio.sleep(rng.uniform(0.0, args.tool_pause))
    if main:
        load.agents_done += 1


def _ping(urls: dict[str, str], out: dict[str, list[float]], stop: threading.Event) -> None:
    """Time a GET of each URL every 0.5 s until ``stop`` (blocking: runs in a thread)."""
    while not stop.wait(0.5):
        for name, url in urls.items():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    resp.read()
            except OSError:
                continue
            out.setdefault(name, []).append(time.monotonic() - t0)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


async def wait_drained(concur_url: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status = await asyncio.to_thread(_get_json, concur_url + "/concur/status")
        if all(status[k] == 0 for k in ("active", "queued", "in_flight", "held")):
            return dict(status)
        if time.monotonic() > deadline:
            return dict(status)
        await asyncio.sleep(0.5)


async def drive(args: argparse.Namespace, concur: Proc, hop_url: str, model: str) -> dict[str, Any]:
    load = Load()
    rss_samples: list[float] = []

    async def sample_rss() -> None:
        while True:
            rss_samples.append(memory_kib(concur.pid) / 1024)
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_rss())
    stop_ping = threading.Event()
    pinger = threading.Thread(
        target=_ping,
        args=(
            {"concur": concur.url + "/healthz", "hop": hop_url + "/soak/health"},
            load.healthz,
            stop_ping,
        ),
        daemon=True,
    )
    pinger.start()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    started = time.monotonic()
    cpu_before = cpu_seconds(concur.pid)
    cut = 0
    probes = round(args.agents * args.probes)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for r in range(args.rounds):
            spent = time.monotonic() - args.t0
            left = args.budget - spent - 2 * IDLE_TIMEOUT - 30.0
            per_round = max(10.0, left / (args.rounds - r))
            tasks = [
                asyncio.create_task(agent(f"r{r}-a{i}", session, concur.url, args, load, model))
                for i in range(args.agents)
            ]
            for role, url in (("direct", hop_url), ("via", concur.url)):
                tasks += [
                    asyncio.create_task(
                        agent(f"r{r}-{role}{i}", session, url, args, load, model, role=role)
                    )
                    for i in range(probes)
                ]
            done, pending = await asyncio.wait(tasks, timeout=per_round)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            cut += len(pending)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            await wait_drained(concur.url, IDLE_TIMEOUT + 30.0)
            load.rss_after_round.append(round(memory_kib(concur.pid) / 1024, 1))
    load_seconds = time.monotonic() - started
    stop_ping.set()
    load.concur_cpu = cpu_seconds(concur.pid) - cpu_before
    status = await wait_drained(concur.url, IDLE_TIMEOUT + 30.0)
    sampler.cancel()
    faults = await asyncio.to_thread(_get_json, hop_url + "/soak/faults")
    return {
        "load": load,
        "status": status,
        "faults": faults,
        "rss": rss_samples,
        "load_seconds": load_seconds,
        "cut": cut,
    }


def _outside(results: list[Result], *, steady: bool) -> list[float]:
    """Time to headers not spent in the engine, for complete steps (steady: step > 0)."""
    return [
        r.added
        for r in results
        if r.kind == "ok" and r.added is not None and (r.step > 0 or not steady)
    ]


def _latency(load: Load) -> dict[str, float | int]:
    """Time to headers outside the engine: anonymous probes through concur vs straight
    to the hop, at the same moment and load (neither is ever queued or faulted).

    Both paths share the loopback hops, the hop's own relay and this machine's load;
    their difference is what concur adds to a request. The main agents' figures add
    admission waits (queued first steps, paused agents held at a step boundary),
    which are concur's purpose rather than its overhead.
    """
    via, base = _outside(load.via, steady=False), _outside(load.direct, steady=False)
    out: dict[str, float | int] = {}
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        a, b = _percentile(via, q), _percentile(base, q)
        out[f"probe_via_concur_{name}"] = round(1000 * a, 2)
        out[f"probe_direct_{name}"] = round(1000 * b, 2)
        out[f"added_by_concur_{name}"] = round(1000 * (a - b), 2)
    steady, every = _outside(load.results, steady=True), _outside(load.results, steady=False)
    out["agents_later_steps_p50"] = round(1000 * _percentile(steady, 0.5), 2)
    out["agents_later_steps_p99"] = round(1000 * _percentile(steady, 0.99), 2)
    out["agents_all_steps_p99"] = round(1000 * _percentile(every, 0.99), 2)
    out["samples_via"], out["samples_direct"] = len(via), len(base)
    engine = [
        r.hop_out - r.hop_in for r in load.results if r.kind == "ok" and r.hop_in and r.hop_out
    ]
    out["engine_time_p50"] = round(1000 * statistics.median(engine or [0.0]), 2)
    return out


def _check(load: Load, faults: dict[str, str]) -> tuple[list[str], collections.Counter[str]]:
    """Every main request's outcome against its fault: (problems, outcomes of unfaulted
    requests that were concur's own errors, by class)."""
    problems: list[str] = []
    unfaulted_errors: collections.Counter[str] = collections.Counter()
    for r in load.results:
        kind = faults.get(r.soak_id)
        if r.kind == "client_disconnected":
            continue
        if kind is not None:
            if r.kind != EXPECTED[kind]:
                problems.append(f"{r.soak_id}: fault {kind} -> {r.kind} {r.error}")
            elif kind in ("500", "503") and r.body != ERROR_BODIES[int(kind)]:
                problems.append(f"{r.soak_id}: fault {kind}, body changed: {r.body[:120]!r}")
        elif r.kind in ("http_429", "http_504"):
            # concur's own answers: a queue timeout, or an engine slower than
            # upstream.first_byte_timeout. Correct, reported, not injected.
            unfaulted_errors[r.kind] += 1
        elif r.kind != "ok":
            problems.append(f"{r.soak_id}: no fault, got {r.kind} {r.error} {r.body[:160]!r}")
    for r in [*load.direct, *load.via]:
        if r.kind != "ok":
            problems.append(f"probe {r.step}: {r.kind} {r.error} {r.body[:160]!r}")
    return problems, unfaulted_errors


def analyse(
    run: dict[str, Any],
    args: argparse.Namespace,
    rss_start: float,
    rss_end: float,
    rss_peak_kib: int,
) -> tuple[dict[str, Any], bool]:
    load: Load = run["load"]
    faults: dict[str, str] = run["faults"]
    results = load.results
    classes = collections.Counter(r.kind for r in results)
    problems, unfaulted_errors = _check(load, faults)
    answered = sum(
        1
        for r in results
        if r.soak_id in faults
        and r.kind != "client_disconnected"
        and r.kind == EXPECTED[faults[r.soak_id]]
    )
    lost = sum(classes[k] for k in ("no_response", "client_timeout", "cut_by_budget"))
    status = run["status"]
    leaked = sum(int(status[k]) for k in ("active", "queued", "in_flight", "held"))
    growth = rss_end - rss_start
    report = {
        "agents": args.agents * args.rounds,
        "steps": args.steps,
        "requests": len(results),
        "responses_by_class": dict(sorted(classes.items())),
        "faults_injected": dict(sorted(collections.Counter(faults.values()).items())),
        "faults_answered_as_expected": answered,
        "unfaulted_concur_errors": dict(sorted(unfaulted_errors.items())),
        "problems": len(problems),
        "problem_examples": problems[:10],
        "client_disconnects_planned": load.disconnect_planned,
        "client_disconnects": classes["client_disconnected"],
        "lost_requests": lost,
        "leaked_slots": leaked,
        "final_status": {k: status[k] for k in ("active", "queued", "in_flight", "held", "window")},
        "agents_completed": load.agents_done,
        "agents_cut_by_budget": run["cut"],
        "load_seconds": round(run["load_seconds"], 1),
        "requests_per_second": round(len(results) / max(run["load_seconds"], 1e-9), 1),
        "concur_cpu_seconds": round(load.concur_cpu, 1),
        "concur_cpu_ms_per_request": round(
            1000 * load.concur_cpu / max(1, len(results) + len(load.via)), 2
        ),
        "latency_outside_engine_ms": _latency(load),
        "probe_steps": {"direct": len(load.direct), "via_concur": len(load.via)},
        "health_check_ms": {
            name: {
                "p50": round(1000 * _percentile(v, 0.5), 1),
                "p99": round(1000 * _percentile(v, 0.99), 1),
                "max": round(1000 * max(v), 1),
            }
            for name, v in sorted(load.healthz.items())
        },
        "concur_rss_mib": {
            "start": round(rss_start, 1),
            "end": round(rss_end, 1),
            "peak": round(rss_peak_kib / 1024, 1),
            "growth": round(growth, 1),
            "after_each_round": load.rss_after_round,
        },
    }
    ok = (
        lost == 0
        and leaked == 0
        and not problems
        and growth < MAX_RSS_GROWTH_MIB
        and run["cut"] == 0
    )
    return report, ok


def print_report(report: dict[str, Any], ok: bool, argv: list[str]) -> None:
    print(f"# soak: {' '.join(argv)}")
    print(f"# machine: {machine()}")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {json.dumps(value)}")
    print("RESULT:", "PASS" if ok else "FAIL")


# ------------------------------------------------------------------ the flood


@dataclass
class FloodResult:
    """One flood request as its client saw it."""

    status: int | None = None
    code: str = ""
    retry_after: str | None = None
    error: str = ""
    seconds: float = 0.0


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


async def flood(args: argparse.Namespace, concur: Proc, model: str) -> dict[str, Any]:
    """The flood (see the module docstring); what it saw, for :func:`analyse_flood`."""
    rss: list[float] = []
    held: list[float] = []

    async def sample() -> None:
        while True:
            rss.append(memory_kib(concur.pid) / 1024)
            text = await asyncio.to_thread(_get_text, concur.url + "/metrics")
            value = _metric(text, "concur_held_body_bytes")
            if value is not None:
                held.append(value)
            await asyncio.sleep(0.25)

    pings: dict[str, list[float]] = {}
    stop_ping = threading.Event()
    pinger = threading.Thread(
        target=_ping, args=({"concur": concur.url + "/healthz"}, pings, stop_ping), daemon=True
    )
    small = {"model": model, "messages": [{"role": "user", "content": "hold"}], "max_tokens": 4}
    pad = max(0, args.flood_body - len(json.dumps(small)) - 20)
    body = json.dumps({**small, "soak_padding": "x" * pad}).encode()
    results = [FloodResult() for _ in range(args.flood)]
    answered = 0
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    rng = random.Random(args.seed)

    async def one(i: int) -> None:
        nonlocal answered
        await asyncio.sleep(rng.uniform(0.0, args.flood_arrival))
        res = results[i]
        headers = {AGENT: f"flood-{i}", DONE: "1", "Content-Type": "application/json"}
        t0 = time.monotonic()
        try:
            async with session.post(concur.url + CHAT, data=body, headers=headers) as resp:
                res.status = resp.status
                res.retry_after = resp.headers.get("Retry-After")
                payload = await resp.read()
                if resp.status != 200:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        res.code = str(json.loads(payload)["error"]["code"])
        except (aiohttp.ClientError, TimeoutError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        res.seconds = time.monotonic() - t0
        answered += 1

    sampler = asyncio.create_task(sample())
    pinger.start()
    rss_start = concur.rss_mib()
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # The window's agents: one step each, not their last, so they stay admitted.
        holders = [f"holder-{i}" for i in range(args.flood_window)]
        for name in holders:
            async with session.post(concur.url + CHAT, json=small, headers={AGENT: name}) as r:
                await r.read()
                assert r.status == 200, r.status
        tasks = [asyncio.create_task(one(i)) for i in range(args.flood)]
        # Every flood request refused or queued, the window still full.
        deadline = time.monotonic() + args.flood_arrival + 120.0
        status: dict[str, Any] = {"queued": 0}
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(_get_json, concur.url + "/concur/status")
            if answered + status["queued"] >= args.flood:
                break
            await asyncio.sleep(0.25)
        queued_at_peak = status["queued"]
        flooded_in = time.monotonic() - started
        for name in holders:  # their last steps: the queue drains
            headers = {AGENT: name, DONE: "1"}
            async with session.post(concur.url + CHAT, json=small, headers=headers) as r:
                await r.read()
        _, pending = await asyncio.wait(tasks, timeout=args.budget)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    status = await wait_drained(concur.url, 30.0)
    text = await asyncio.to_thread(_get_text, concur.url + "/metrics")
    stop_ping.set()
    sampler.cancel()
    return {
        "results": results,
        "cut": len(pending),
        "status": status,
        "queued_at_peak": queued_at_peak,
        "flooded_in": flooded_in,
        "seconds": time.monotonic() - started,
        "rss_start": rss_start,
        "rss": rss,
        "held": held,
        "held_end": _metric(text, "concur_held_body_bytes"),
        "refused_metric": _metric(text, 'concur_admissions_total{outcome="overloaded"}'),
        "pings": pings.get("concur", []),
        "body_bytes": len(body),
    }


def analyse_flood(
    run: dict[str, Any], args: argparse.Namespace, rss_peak_kib: int
) -> tuple[dict[str, Any], bool]:
    results: list[FloodResult] = run["results"]
    statuses = collections.Counter(
        str(r.status) if r.status is not None else "no_response" for r in results
    )
    codes = collections.Counter(r.code for r in results if r.status not in (None, 200))
    refused = [r for r in results if r.status == 503]
    without_retry = sum(1 for r in refused if not r.retry_after)
    errors = [r.error for r in results if r.error]
    budget_mib = args.flood_held_mib
    peak = rss_peak_kib / 1024
    growth = peak - run["rss_start"]
    status = run["status"]
    leaked = sum(int(status[k]) for k in ("active", "queued", "in_flight", "held"))
    pings = run["pings"]
    answered = sum(1 for r in results if r.status is not None)
    refused_s = [r.seconds for r in refused]
    report = {
        "flood_agents": args.flood,
        "body_bytes": run["body_bytes"],
        "window": args.flood_window,
        "held_budget_mib": budget_mib,
        "requests": len(results),
        "answered": answered,
        "statuses": dict(sorted(statuses.items())),
        "refusal_codes": dict(sorted(codes.items())),
        "refused_without_retry_after": without_retry,
        "refused_answer_ms": {
            "p50": round(1000 * _percentile(refused_s, 0.5), 1),
            "p99": round(1000 * _percentile(refused_s, 0.99), 1),
            "max": round(1000 * max(refused_s or [0.0]), 1),
        },
        "client_errors": len(errors),
        "client_error_examples": errors[:5],
        "cut_by_budget": run["cut"],
        "queued_at_peak": run["queued_at_peak"],
        "held_bytes_peak_mib": round(max(run["held"] or [0.0]) / (1 << 20), 1),
        "held_bytes_end": run["held_end"],
        "refused_metric": run["refused_metric"],
        "leaked_slots": leaked,
        "healthz_ms": {
            "samples": len(pings),
            "p50": round(1000 * _percentile(pings, 0.5), 1),
            "p99": round(1000 * _percentile(pings, 0.99), 1),
            "max": round(1000 * max(pings or [0.0]), 1),
        },
        "concur_rss_mib": {
            "start": round(run["rss_start"], 1),
            "peak": round(peak, 1),
            "growth": round(growth, 1),
            "end": round(run["rss"][-1], 1) if run["rss"] else None,
        },
        "flooded_in_seconds": round(run["flooded_in"], 1),
        "seconds": round(run["seconds"], 1),
    }
    ok = (
        answered == len(results)
        and not errors
        and run["cut"] == 0
        and set(statuses) <= {"200", "503", "429"}
        and set(codes) <= {"overloaded", "queue_timeout"}
        and without_retry == 0
        and run["held_end"] == 0
        and leaked == 0
        and len(pings) > 0
        and growth < budget_mib + FLOOD_RSS_SLACK_MIB
    )
    return report, ok


async def main_async(args: argparse.Namespace, logs: Path) -> tuple[dict[str, Any], bool]:
    engine_port, hop_port, concur_port = free_port(), free_port(), free_port()
    engine = Proc(
        "engine",
        [
            PY,
            "-m",
            "concur.sim.server.cli",
            "--model",
            args.model,
            "--tp",
            "1",
            "--kv-tokens",
            str(args.kv_tokens),
            "--speed",
            str(args.speed),
            "--port",
            str(engine_port),
            "--log-level",
            "warning",
        ],
        f"http://127.0.0.1:{engine_port}",
        log_path=logs / "engine.log",
    )
    hop = Proc(
        "hop",
        [
            PY,
            str(HERE / "_faulty_hop.py"),
            "--upstream",
            engine.url,
            "--port",
            str(hop_port),
            "--rate",
            str(args.faults),
            "--seed",
            str(args.seed),
        ],
        f"http://127.0.0.1:{hop_port}",
        ready_path="/soak/health",
        log_path=logs / "hop.log",
    )
    concur = Proc(
        "concur",
        [
            *(
                [PY, str(HERE / "_profiled.py"), str(args.profile_concur), "concur"]
                if args.profile_concur
                else [PY, "-m", "concur.cli"]
            ),
            "serve",
            "--upstream",
            hop.url,
            "--listen",
            f"127.0.0.1:{concur_port}",
            "--log-level",
            "warning",
            "--set",
            f"engine.metrics_url={engine.url}/metrics",
            "--set",
            # (the flood's window agents stay admitted, idle, while the flood arrives)
            f"admission.idle_timeout={600 if args.flood else IDLE_TIMEOUT}",
            "--set",
            f"upstream.first_byte_timeout={FIRST_BYTE_TIMEOUT}",
            "--set",
            "admission.anonymous=bypass",  # the "via" probes: through concur, never gated
            *(["--policy", args.policy] if args.policy and not args.flood else []),
            *(
                [
                    "--policy",
                    f"static:{args.flood_window}",
                    "--set",
                    f"server.max_held_bytes={args.flood_held_mib << 20}",
                ]
                if args.flood
                else []
            ),
        ],
        f"http://127.0.0.1:{concur_port}",
        ready_path="/healthz",
        log_path=logs / "concur.log",
    )
    procs = [engine, hop, concur]
    try:
        for p in procs:
            p.start()
        model = _get_json(engine.url + "/v1/models")["data"][0]["id"]
        if args.flood:
            flooded = await flood(args, concur, model)
            return analyse_flood(flooded, args, memory_kib(concur.pid, "VmHWM"))
        rss_start = concur.rss_mib()
        run = await drive(args, concur, hop.url, model)
        rss_end = concur.rss_mib()
        peak = memory_kib(concur.pid, "VmHWM")
        return analyse(run, args, rss_start, rss_end, peak)
    finally:
        for p in reversed(procs):
            p.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--speed", type=float, default=50.0, help="engine: simulated s per wall s")
    ap.add_argument("--model", default="llama-3-8b", help="engine model preset")
    ap.add_argument("--kv-tokens", type=int, default=400_000, help="engine KV capacity")
    ap.add_argument("--policy", default=None, help="concur policy (default: concur's default)")
    ap.add_argument("--max-tokens", type=int, default=16, help="output tokens per step")
    ap.add_argument("--disconnect", type=float, default=0.05, help="share of agents hanging up")
    ap.add_argument("--faults", type=float, default=0.02, help="share of requests broken")
    ap.add_argument(
        "--probes",
        type=float,
        default=0.05,
        help="extra agents, as a share of --agents, that bypass concur (latency baseline)",
    )
    ap.add_argument("--arrival", type=float, default=20.0, help="agents arrive over this many s")
    ap.add_argument("--tool-pause", type=float, default=0.2, help="max pause between steps, s")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--budget", type=float, default=600.0, help="bound on the whole run, s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole load this many times against the same processes (RSS plateau)",
    )
    ap.add_argument(
        "--profile-concur", type=Path, default=None, help="run concur under cProfile (CPU time)"
    )
    ap.add_argument(
        "--flood", type=int, default=0, help="run the flood with this many new agents instead"
    )
    ap.add_argument("--flood-body", type=int, default=400_000, help="flood: bytes per body")
    ap.add_argument("--flood-window", type=int, default=8, help="flood: agents filling the window")
    ap.add_argument(
        "--flood-held-mib", type=int, default=128, help="flood: server.max_held_bytes, MiB"
    )
    ap.add_argument(
        "--flood-arrival", type=float, default=5.0, help="flood: agents arrive over this many s"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--logs", type=Path, default=None, help="keep process logs in this folder")
    args = ap.parse_args(argv)
    args.t0 = time.monotonic()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="concur-soak-"))
    logs.mkdir(parents=True, exist_ok=True)
    report, ok = asyncio.run(main_async(args, logs))
    report["wall_seconds"] = round(time.monotonic() - args.t0, 1)
    report["logs"] = str(logs)
    print_report(report, ok, ["bench/soak.py", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
