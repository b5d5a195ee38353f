"""The benchmark's report: markdown tables and issue 3's targets, checked as paired ratios.

Every repeat runs every path once, back to back, so a repeat's paths saw the same
machine. Targets pair each repeat's concur with that repeat's bare pass-through and
direct path: throughput is judged on the median of the per-repeat ratios, added
time to first byte on the median of the per-repeat differences from direct
(concur's over the bare pass-through's; a ratio of two such small differences per
repeat would be mostly noise). Each line also gives the spread of the per-repeat
figures, so a run can tell a miss from noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from _load import Sample

MAX_ADDED_P50_MS_AT_1 = 1.0
"""At 1 client, concur may add this much to the direct path's p50 time to first byte."""
MIN_THROUGHPUT_RATIO = 0.9
"""At 64 and 256 clients, concur's streams/s over the bare pass-through's."""
MAX_ADDED_TTFB_RATIO = 1.2
"""At 64 and 256 clients, concur's added p50 TTFB over the bare pass-through's."""
ADDED_TTFB_FLOOR_MS = 1.0
"""The bare pass-through's added TTFB is floored at this (the 1-client budget), so noise
around zero cannot decide the ratio."""
MAX_QUEUED_RSS_MB = 100.0
"""RSS that 1,000 queued agents held open may add to concur, in MB (10^6 bytes)."""
MIB = 1.048576

Cases = dict[tuple[str, int], list[Sample]]


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


@dataclass
class Row:
    """One path at one client count: medians over the repeats."""

    target: str
    clients: int
    p50: float
    p99: float
    rate: float
    errors: int
    proxy_cpu: float | None
    proxy_cpu_ms: float | None
    proxy_rss: float | None
    client_cpu_ms: float
    upstream_cpu_ms: float


def aggregate(samples: list[Sample]) -> Row:
    s0 = samples[0]
    proxied = s0.proxy_cpu is not None

    def per_stream(attr: str) -> float:
        return median([1000.0 * getattr(s, attr) / max(1, s.completed) for s in samples])

    return Row(
        target=s0.target,
        clients=s0.clients,
        p50=median([s.pct(0.50) for s in samples]),
        p99=median([s.pct(0.99) for s in samples]),
        rate=median([s.rate for s in samples]),
        errors=sum(s.errors for s in samples),
        proxy_cpu=median([s.proxy_cpu or 0.0 for s in samples]) if proxied else None,
        proxy_cpu_ms=per_stream("proxy_cpu") if proxied else None,
        proxy_rss=max(s.proxy_rss or 0.0 for s in samples) if proxied else None,
        client_cpu_ms=per_stream("client_cpu"),
        upstream_cpu_ms=per_stream("upstream_cpu"),
    )


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    """The README table: one row per path and client count."""
    direct = {r.clients: r for r in rows if r.target == "direct"}
    lines = [
        "| clients | path | TTFB p50 (ms) | TTFB p99 (ms) | added p50 (ms) | streams/s "
        "| proxy CPU (s) | proxy CPU / stream (ms) | proxy RSS (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = direct.get(r.clients)
        added = None if base is None or r.target == "direct" else r.p50 - base.p50
        lines.append(
            f"| {r.clients} | {r.target} | {_fmt(r.p50)} | {_fmt(r.p99)} | {_fmt(added)} "
            f"| {_fmt(r.rate, 0 if r.rate >= 10 else 1)} | {_fmt(r.proxy_cpu)} "
            f"| {_fmt(r.proxy_cpu_ms if r.rate else None, 3)} "
            f"| {_fmt(r.proxy_rss, 0)} |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[Row]) -> str:
    """Where the machine's CPU went per stream, besides the proxy."""
    lines = [
        "| clients | path | client CPU / stream (ms) | upstream CPU / stream (ms) | errors |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        client = r.client_cpu_ms if r.rate else None
        upstream = r.upstream_cpu_ms if r.rate else None
        lines.append(
            f"| {r.clients} | {r.target} | {_fmt(client, 3)} | {_fmt(upstream, 3)} | {r.errors} |"
        )
    return "\n".join(lines)


def _spread(ratios: Sequence[float]) -> str:
    """The range of the per-repeat ratios, when there is more than one."""
    xs = [x for x in ratios if not math.isnan(x)]
    return f"; per repeat {min(xs):.2f}-{max(xs):.2f}x" if len(xs) > 1 else ""


def _verdict(ok: bool) -> str:
    return "[PASS]" if ok else "[FAIL]"


def check_targets(cases: Cases, concur: str, bare: str, counts: Sequence[int]) -> list[str]:
    """One PASS/FAIL line per target for the path ``concur``, judged against ``bare``."""
    out: list[str] = []
    for n in counts:
        c, d = cases.get((concur, n)), cases.get(("direct", n))
        if not c or not d:
            continue
        added = median([ci.pct(0.5) - di.pct(0.5) for ci, di in zip(c, d, strict=False)])
        if n == 1:
            ratio = added / MAX_ADDED_P50_MS_AT_1
            out.append(
                f"{_verdict(ratio <= 1.0)} {n} client, {concur}: added p50 TTFB {added:.3f} ms "
                f"vs direct = {ratio:.2f}x the {MAX_ADDED_P50_MS_AT_1:g} ms budget (<= 1.00)"
            )
            continue
        b = cases.get((bare, n))
        if not b:
            continue
        rates = [ci.rate / bi.rate for ci, bi in zip(c, b, strict=False) if bi.rate]
        rate = median(rates)
        out.append(
            f"{_verdict(rate >= MIN_THROUGHPUT_RATIO)} {n} clients, {concur}: throughput "
            f"{median([s.rate for s in c]):.0f}/s vs {bare} {median([s.rate for s in b]):.0f}/s"
            f" = {rate:.2f}x (>= {MIN_THROUGHPUT_RATIO}){_spread(rates)}"
        )
        b_added = median([bi.pct(0.5) - di.pct(0.5) for bi, di in zip(b, d, strict=False)])
        ttfb = added / max(b_added, ADDED_TTFB_FLOOR_MS)
        ttfbs = [
            (ci.pct(0.5) - di.pct(0.5)) / max(bi.pct(0.5) - di.pct(0.5), ADDED_TTFB_FLOOR_MS)
            for ci, bi, di in zip(c, b, d, strict=False)
        ]
        out.append(
            f"{_verdict(ttfb <= MAX_ADDED_TTFB_RATIO)} {n} clients, {concur}: added p50 TTFB "
            f"{added:.2f} ms vs {bare} {b_added:.2f} ms = {ttfb:.2f}x (<= {MAX_ADDED_TTFB_RATIO})"
            f"{_spread(ttfbs)}"
        )
        cpu = median(
            [
                (ci.cpu_per_stream_ms() or math.nan) / (bi.cpu_per_stream_ms() or math.nan)
                for ci, bi in zip(c, b, strict=False)
            ]
        )
        out.append(f"  (info) {n} clients: {concur} CPU per stream = {cpu:.2f}x {bare}'s")
    return out


def check_queued(agents: int, queued: int, before_mib: float, after_mib: float) -> str:
    """The line for the queued-agents target; RSS figures in MiB."""
    grown_mb = (after_mib - before_mib) * MIB
    ok = grown_mb <= MAX_QUEUED_RSS_MB and queued >= agents
    return (
        f"{_verdict(ok)} {queued} of {agents} agents queued and held open: concur RSS "
        f"{before_mib * MIB:.1f} -> {after_mib * MIB:.1f} MB (+{grown_mb:.1f} MB, "
        f"{1000 * grown_mb / max(1, queued):.1f} kB/agent) = "
        f"{grown_mb / MAX_QUEUED_RSS_MB:.2f}x the {MAX_QUEUED_RSS_MB:.0f} MB budget"
    )


def _side(ratios: Sequence[float], lower: str, higher: str) -> str:
    """Which side every repeat agrees on: ``lower`` when each ratio is below 1, ``higher``
    when each is above, else neither (the difference is within the run-to-run spread)."""
    xs = [x for x in ratios if not math.isnan(x)]
    if len(xs) > 1 and max(xs) < 1.0:
        return lower
    if len(xs) > 1 and min(xs) > 1.0:
        return higher
    return "within the spread"


def compare_paths(cases: Cases, path: str, base: str, counts: Sequence[int]) -> list[str]:
    """One line per client count: ``path`` against ``base`` (two concur builds or framers)
    on the same repeats. CPU per stream and throughput are per-repeat ratios (path over
    base), shown as their median and range; the verdict names the cheaper (or faster)
    one only when every repeat agrees, i.e. when it wins by more than the spread."""
    out: list[str] = []
    for n in counts:
        p, b = cases.get((path, n)), cases.get((base, n))
        if not p or not b:
            continue
        cpus = [
            (pi.cpu_per_stream_ms() or math.nan) / (bi.cpu_per_stream_ms() or math.nan)
            for pi, bi in zip(p, b, strict=False)
        ]
        rates = [pi.rate / bi.rate if bi.rate else math.nan for pi, bi in zip(p, b, strict=False)]
        out.append(
            f"{n} clients, {path} / {base}: CPU per stream {median(cpus):.3f}x{_spread(cpus)} "
            f"[cheaper: {_side(cpus, path, base)}]; throughput {median(rates):.3f}x"
            f"{_spread(rates)} [faster: {_side(rates, base, path)}]"
        )
    return out
