"""bench/_report.py: the proxy benchmark's verdicts, issue 3's targets on paired repeats."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _load import Sample
from _report import check_queued, check_targets, compare_paths


def sample(target: str, clients: int, p50_ms: float, rate: float) -> Sample:
    """A case whose every time to first byte is ``p50_ms``, moving ``rate`` streams/s."""
    proxied = target != "direct"
    return Sample(
        target=target,
        clients=clients,
        window=1.0,
        ttfbs=[p50_ms / 1000.0] * 10,
        completed=int(rate),
        errors=0,
        proxy_cpu=0.5 if proxied else None,
        proxy_rss=50.0 if proxied else None,
        upstream_cpu=0.1,
        client_cpu=0.1,
    )


def cases(
    n: int, direct: list[float], concur: list[float], bare: list[float], rates: tuple[float, float]
) -> dict[tuple[str, int], list[Sample]]:
    return {
        ("direct", n): [sample("direct", n, x, 5000) for x in direct],
        ("concur", n): [sample("concur", n, x, rates[0]) for x in concur],
        ("bare", n): [sample("bare", n, x, rates[1]) for x in bare],
    }


def lines(out: list[str], word: str) -> list[str]:
    return [line for line in out if word in line]


def test_added_ttfb_is_judged_on_the_median_paired_difference_with_its_spread() -> None:
    # Per repeat, concur adds 10, 12, 30 ms and the pass-through 10, 10, 10 ms: the
    # median difference (12 ms) is 1.2x, right on the target; the spread shows the outlier.
    out = check_targets(
        cases(256, [40, 40, 40], [50, 52, 70], [50, 50, 50], (3000, 3000)), "concur", "bare", [256]
    )
    (ttfb,) = lines(out, "TTFB")
    assert ttfb.startswith("[PASS]")
    assert "= 1.20x" in ttfb
    assert "per repeat 1.00-3.00x" in ttfb

    out = check_targets(
        cases(256, [40, 40, 40], [53, 53, 53], [50, 50, 50], (3000, 3000)), "concur", "bare", [256]
    )
    assert lines(out, "TTFB")[0].startswith("[FAIL]")


def test_throughput_below_nine_tenths_of_the_pass_through_fails() -> None:
    ok = check_targets(cases(64, [9], [17], [17], (3600, 4000)), "concur", "bare", [64])
    low = check_targets(cases(64, [9], [17], [17], (3500, 4000)), "concur", "bare", [64])
    assert lines(ok, "throughput")[0].startswith("[PASS]")
    assert lines(low, "throughput")[0].startswith("[FAIL]")
    assert "per repeat" not in lines(ok, "throughput")[0]  # one repeat: no spread to show


@pytest.mark.parametrize(("added_ms", "verdict"), [(0.9, "[PASS]"), (1.1, "[FAIL]")])
def test_one_client_budget_is_one_millisecond_over_direct(added_ms: float, verdict: str) -> None:
    runs = cases(1, [0.3], [0.3 + added_ms], [0.7], (1200, 1200))
    out = check_targets(runs, "concur", "bare", [1])
    assert len(out) == 1
    assert out[0].startswith(verdict)


def test_the_bare_pass_through_added_ttfb_is_floored_so_noise_cannot_decide() -> None:
    # The pass-through adds 0.1 ms, concur 1.1 ms: judged against the 1 ms floor, 1.10x.
    out = check_targets(cases(64, [9.0], [10.1], [9.1], (3600, 3600)), "concur", "bare", [64])
    (ttfb,) = lines(out, "TTFB")
    assert ttfb.startswith("[PASS]") and "= 1.10x" in ttfb


def test_queued_agents_budget_and_every_agent_must_be_queued() -> None:
    mib = 1 / 1.048576
    assert check_queued(1000, 1000, 75 * mib, 90 * mib).startswith("[PASS]")
    assert check_queued(1000, 1000, 75 * mib, 180 * mib).startswith("[FAIL]")
    assert check_queued(1000, 999, 75 * mib, 80 * mib).startswith("[FAIL]")


def _repeats(path: str, cpu_ms: list[float], rates: list[float]) -> list[Sample]:
    """Repeats of one path at 64 clients: each with its CPU per stream and streams/s."""
    return [
        Sample(
            target=path,
            clients=64,
            window=1.0,
            ttfbs=[0.01],
            completed=int(rate),
            errors=0,
            proxy_cpu=cpu * rate / 1000.0,
            proxy_rss=50.0,
            upstream_cpu=0.1,
            client_cpu=0.1,
        )
        for cpu, rate in zip(cpu_ms, rates, strict=True)
    ]


def test_a_path_wins_only_when_every_repeat_agrees() -> None:
    base = _repeats("builtin", [1.0, 1.0, 1.0], [1000, 1000, 1000])
    cheaper = _repeats("other", [0.9, 0.95, 0.8], [1100, 1000, 900])
    (line,) = compare_paths(
        {("other", 64): cheaper, ("builtin", 64): base}, "other", "builtin", [1, 64]
    )
    assert "CPU per stream 0.900x; per repeat 0.80-0.95x [cheaper: other]" in line
    # Throughput: 1.1x, 1.0x, 0.9x: no repeat-wide winner.
    assert "throughput 1.000x; per repeat 0.90-1.10x [faster: within the spread]" in line

    dearer = _repeats("other", [1.2, 0.99, 1.1], [900, 950, 990])
    (line,) = compare_paths(
        {("other", 64): dearer, ("builtin", 64): base}, "other", "builtin", [64]
    )
    assert "[cheaper: within the spread]" in line  # one repeat went the other way
    assert "[faster: builtin]" in line

    # One repeat shows no spread, so it names no winner.
    (line,) = compare_paths(
        {("other", 64): cheaper[:1], ("builtin", 64): base[:1]}, "other", "builtin", [64]
    )
    assert "[cheaper: within the spread]" in line and "per repeat" not in line
