"""Per-interval rates from successive signals, including counter resets."""

from __future__ import annotations

from pathlib import Path

import pytest

from concur.adapters.rates import Rates, derive
from concur.adapters.signal import EngineSignal
from concur.adapters.vllm import parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"


def vllm(
    t: float, hits: float | None, queries: float | None, preempt: float | None
) -> EngineSignal:
    return EngineSignal(
        timestamp=t, prefix_hits_total=hits, prefix_queries_total=queries, preemptions_total=preempt
    )


def test_first_reading_has_no_interval() -> None:
    assert derive(None, vllm(1.0, 100.0, 200.0, 5.0)) == Rates(
        hit_rate=None, new_preemptions=None, reset=False
    )


def test_first_reading_uses_the_engines_gauge() -> None:
    cur = EngineSignal(timestamp=1.0, hit_rate=0.4)
    assert derive(None, cur) == Rates(hit_rate=0.4, new_preemptions=None, reset=False)


def test_deltas_over_the_interval() -> None:
    rates = derive(vllm(1.0, 100.0, 200.0, 5.0), vllm(2.0, 160.0, 300.0, 8.0))
    assert rates == Rates(hit_rate=0.6, new_preemptions=3.0, reset=False)


def test_interval_rate_differs_from_lifetime_ratio() -> None:
    # lifetime 900/1000 = 0.9, but this interval only hit 0/100
    rates = derive(vllm(1.0, 900.0, 900.0, 0.0), vllm(2.0, 900.0, 1000.0, 0.0))
    assert rates.hit_rate == 0.0
    assert rates.new_preemptions == 0.0


def test_no_queries_in_the_interval_is_unknown() -> None:
    rates = derive(vllm(1.0, 100.0, 200.0, 5.0), vllm(2.0, 100.0, 200.0, 5.0))
    assert rates.hit_rate is None
    assert rates.new_preemptions == 0.0


def test_gauge_fallback_when_counters_are_absent() -> None:
    prev = EngineSignal(timestamp=1.0, hit_rate=0.2, preemptions_total=4.0)
    cur = EngineSignal(timestamp=2.0, hit_rate=0.7, preemptions_total=9.0)
    assert derive(prev, cur) == Rates(hit_rate=0.7, new_preemptions=5.0, reset=False)


def test_counter_that_appears_only_now_has_no_delta() -> None:
    rates = derive(vllm(1.0, None, None, None), vllm(2.0, 10.0, 20.0, 1.0))
    assert rates == Rates(hit_rate=None, new_preemptions=None, reset=False)


def test_counter_that_disappears_has_no_delta() -> None:
    rates = derive(vllm(1.0, 10.0, 20.0, 1.0), vllm(2.0, None, None, None))
    assert rates == Rates(hit_rate=None, new_preemptions=None, reset=False)


def test_reset_uses_a_zero_baseline() -> None:
    prev = vllm(1.0, 10_000.0, 20_000.0, 40.0)
    cur = vllm(2.0, 50.0, 100.0, 2.0)  # the engine restarted in between
    assert derive(prev, cur) == Rates(hit_rate=0.5, new_preemptions=2.0, reset=True)


def test_one_counter_going_back_resets_them_all() -> None:
    prev = vllm(1.0, 100.0, 200.0, 40.0)
    cur = vllm(2.0, 150.0, 250.0, 3.0)  # preemptions restarted from zero
    rates = derive(prev, cur)
    assert rates.reset is True
    assert rates.new_preemptions == 3.0
    assert rates.hit_rate == pytest.approx(150.0 / 250.0)


def test_hit_rate_is_clamped_to_one() -> None:
    rates = derive(vllm(1.0, 0.0, 0.0, None), vllm(2.0, 120.0, 100.0, None))
    assert rates.hit_rate == 1.0
    assert rates.new_preemptions is None


def test_on_parsed_vllm_pages() -> None:
    text = (FIXTURES / "vllm-0.11.0.txt").read_text()
    before = parse(text, 10.0)
    after_text = (
        text.replace(
            'vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} 1.048576e+06',
            'vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} 1.049576e+06',
        )
        .replace(
            'vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} 786432.0',
            'vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} 786682.0',
        )
        .replace(
            'vllm:num_preemptions_total{engine="0",model_name="Qwen/Qwen3-8B"} 31.0',
            'vllm:num_preemptions_total{engine="0",model_name="Qwen/Qwen3-8B"} 33.0',
        )
    )
    assert after_text.count("\n") == text.count("\n")
    after = parse(after_text, 10.5)
    assert derive(before, after) == Rates(hit_rate=0.25, new_preemptions=2.0, reset=False)


# ------------------------------------------------------- data-parallel ranks

DP2 = "vllm-0.33.0-dp2-multiprocess.txt"
M = 'model_name="Qwen/Qwen3-32B"'


def _set(text: str, metric: str, engine: str, value: float) -> str:
    """The page with one engine's sample of ``metric`` set to ``value``."""
    pattern = f'{metric}{{engine="{engine}",{M}}} '
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(pattern)]
    assert len(hits) == 1, (metric, engine)
    lines[hits[0]] = f"{pattern}{value}"
    return "\n".join(lines) + "\n"


def _without_engine(text: str, engine: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if f'engine="{engine}"' not in line)


def test_one_rank_restarting_resets_only_its_own_counters() -> None:
    base = (FIXTURES / DP2).read_text()
    prev = parse(base, 0.0)
    assert prev.preemptions_total == 14.0  # engine 0: 4, engine 1: 10
    # Engine 1 restarts (its counters drop to 0); engine 0 preempts 2 more, and its
    # prefix cache hits all of its 200k new queried tokens.
    page = _set(base, "vllm:num_preemptions_total", "1", 0.0)
    page = _set(page, "vllm:num_preemptions_total", "0", 6.0)
    page = _set(page, "vllm:prefix_cache_hits_total", "1", 0.0)
    page = _set(page, "vllm:prefix_cache_queries_total", "1", 0.0)
    page = _set(page, "vllm:prefix_cache_hits_total", "0", 380000.0)
    page = _set(page, "vllm:prefix_cache_queries_total", "0", 500000.0)
    rates = derive(prev, parse(page, 1.0))
    assert rates == Rates(hit_rate=1.0, new_preemptions=2.0, reset=True)


def test_a_rank_missing_from_a_scrape_adds_nothing_when_it_leaves_or_returns() -> None:
    base = (FIXTURES / DP2).read_text()
    full = parse(base, 0.0)
    partial = parse(_without_engine(base, "1"), 1.0)
    assert partial.engines == 1
    assert derive(full, partial) == Rates(hit_rate=None, new_preemptions=0.0, reset=False)
    assert derive(partial, full.at(2.0)) == Rates(hit_rate=None, new_preemptions=0.0, reset=False)
