"""vLLM adapter on real page shapes (0.6 V0 to 0.33, DP, multiprocess) and on traps."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from concur.adapters.errors import AdapterError
from concur.adapters.signal import EngineSignal
from concur.adapters.vllm import parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"


def page(name: str) -> str:
    return (FIXTURES / name).read_text()


EXPECTED = {
    "vllm-0.6.6.txt": EngineSignal(
        timestamp=5.0,
        kv_usage=0.4375,
        running=7,
        waiting=3,
        preemptions_total=12.0,
        hit_rate=0.6234,
        kv_capacity_tokens=28123 * 16,
        engines=1,
    ),
    "vllm-0.11.0.txt": EngineSignal(
        timestamp=5.0,
        kv_usage=0.8125,
        running=12,
        waiting=4,
        preemptions_total=31.0,
        prefix_hits_total=786432.0,
        prefix_queries_total=1048576.0,
        kv_capacity_tokens=18530 * 16,
        engines=1,
    ),
    "vllm-0.11.0-dp2.txt": EngineSignal(
        timestamp=5.0,
        kv_usage=0.83,  # max over engines (0.61, 0.83)
        running=24,  # 10 + 14
        waiting=2,  # 2 + 0
        preemptions_total=14.0,  # 5 + 9
        prefix_hits_total=550000.0,
        prefix_queries_total=1000000.0,
        kv_capacity_tokens=37060 * 16,  # the DP total, written on both series: not doubled
        engines=2,
    ),
    "vllm-0.11.0-multiprocess.txt": EngineSignal(
        timestamp=5.0,
        kv_usage=0.55,  # two API-server pids report 0.55 and 0.5
        running=9,
        waiting=1,
        preemptions_total=3.0,
        prefix_hits_total=250000.0,
        prefix_queries_total=500000.0,
        kv_capacity_tokens=18530 * 16,
        engines=1,
    ),
    "vllm-0.33.0.txt": EngineSignal(
        timestamp=5.0,
        kv_usage=0.9,
        running=16,
        waiting=9,
        preemptions_total=57.0,
        prefix_hits_total=4200000.0,
        prefix_queries_total=5000000.0,
        kv_capacity_tokens=196608,  # kv_cache_size_tokens, not 24576 x 16
        engines=1,
    ),
    "vllm-0.33.0-dp2-multiprocess.txt": EngineSignal(
        timestamp=5.0,
        kv_usage=0.91,
        running=14,
        waiting=6,
        preemptions_total=14.0,
        prefix_hits_total=330000.0,
        prefix_queries_total=700000.0,
        kv_capacity_tokens=2 * 320000,  # per-engine kv_cache_size_tokens, summed
        engines=2,
    ),
}

_SAMPLE = re.compile(r"^(?P<name>[^\s{#]+)\{(?P<labels>.*)\}(?P<rest>\s.*)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def reverse_labels(text: str) -> str:
    """The same page with every sample's labels in reverse order."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            pairs = _LABEL.findall(match["labels"])
            labels = ",".join(f'{k}="{v}"' for k, v in reversed(pairs))
            line = f"{match['name']}{{{labels}}}{match['rest']}"
        out.append(line)
    return "\n".join(out) + "\n"


def drop(text: str, *prefixes: str) -> str:
    """The page without the sample lines of the given metrics."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(prefixes))


def totals_only(signal: EngineSignal) -> EngineSignal:
    """``signal`` without its per-engine counters (the totals, which sum them, stay)."""
    return replace(signal, counter_series=())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_reads_exactly(name: str) -> None:
    assert totals_only(parse(page(name), 5.0)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_label_order_does_not_matter(name: str) -> None:
    reordered = reverse_labels(page(name))
    assert reordered != page(name)
    assert parse(reordered, 5.0) == parse(page(name), 5.0)
    assert totals_only(parse(reordered, 5.0)) == EXPECTED[name]


def test_counters_are_kept_per_engine() -> None:
    signal = parse(page("vllm-0.33.0-dp2-multiprocess.txt"), 5.0)
    engines = {key for _, key, _ in signal.counter_series}
    assert len(engines) == 2 and {key[1] for key in engines} == {"0", "1"}
    assert [c for c, key, _ in signal.counter_series if key[1] == "0"] == [
        "preemptions",
        "prefix_hits",
        "prefix_queries",
    ]


def test_timestamp_is_the_callers() -> None:
    assert parse(page("vllm-0.11.0.txt"), 1234.5).timestamp == 1234.5


def test_created_series_are_ignored() -> None:
    text = page("vllm-0.11.0.txt")
    assert "vllm:num_preemptions_created" in text
    without = drop(text, "vllm:num_preemptions_created", "vllm:prefix_cache_hits_created")
    assert parse(without, 5.0) == parse(text, 5.0)


def test_waiting_by_reason_is_not_read_as_waiting() -> None:
    text = (
        "# TYPE vllm:num_requests_waiting_by_reason gauge\n"
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 40.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="deferred"} 2.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 7.0\n'
    )
    assert parse(text, 0.0).waiting == 7


def test_missing_kv_metric_reads_as_unknown_not_error() -> None:
    text = drop(page("vllm-0.11.0.txt"), "vllm:kv_cache_usage_perc")
    signal = parse(text, 5.0)
    assert signal.kv_usage is None
    assert signal.running == 12
    assert signal.kv_capacity_tokens == 18530 * 16


def test_each_missing_metric_reads_as_none() -> None:
    text = drop(
        page("vllm-0.33.0.txt"),
        "vllm:num_requests_running",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_hits_total",
        "vllm:cache_config_info",
    )
    signal = parse(text, 5.0)
    assert signal.running is None
    assert signal.preemptions_total is None
    assert signal.prefix_hits_total is None
    assert signal.kv_capacity_tokens is None
    assert signal.prefix_queries_total == 5000000.0
    assert signal.waiting == 9


def test_zero_is_a_value_not_unknown() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0\n'
        'vllm:num_preemptions_total{engine="0",model_name="m"} 0.0\n'
    )
    signal = parse(text, 0.0)
    assert (signal.running, signal.kv_usage, signal.preemptions_total) == (0, 0.0, 0.0)
    assert signal.waiting is None


def test_nan_reads_as_unknown() -> None:
    text = (
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
    )
    signal = parse(text, 0.0)
    assert signal.kv_usage is None
    assert signal.running == 3


def test_dp_engines_sum_counts_and_take_max_usage() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
        'vllm:num_requests_running{engine="2",model_name="m"} 5.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.9\n'
        'vllm:kv_cache_usage_perc{engine="2",model_name="m"} 0.4\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 10.0\n'
        'vllm:prefix_cache_queries_total{engine="2",model_name="m"} 30.0\n'
    )
    signal = parse(text, 0.0)
    assert signal.running == 12
    assert signal.kv_usage == 0.9
    assert signal.prefix_queries_total == 40.0
    assert signal.engines == 3


def test_several_models_aggregate_like_engines() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="a"} 2.0\n'
        'vllm:num_requests_running{engine="0",model_name="b"} 5.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.7\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="b"} 0.3\n'
    )
    signal = parse(text, 0.0)
    assert signal.running == 7
    assert signal.kv_usage == 0.7
    assert signal.engines == 2


def test_new_names_win_over_deprecated_ones() -> None:
    # 0.9-0.10 export both spellings; the deprecated ones may lag or differ.
    text = (
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.1\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        'vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 1.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 80.0\n'
        'vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 2.0\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
    )
    signal = parse(text, 0.0)
    assert (signal.kv_usage, signal.prefix_hits_total, signal.prefix_queries_total) == (
        0.5,
        80.0,
        100.0,
    )


def test_v1_0_8_deprecated_names_are_read() -> None:
    text = (
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 30.0\n'
        'vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 40.0\n'
    )
    signal = parse(text, 0.0)
    assert (signal.kv_usage, signal.prefix_hits_total, signal.prefix_queries_total) == (
        0.25,
        30.0,
        40.0,
    )
    assert signal.hit_rate is None


def test_v0_hit_rate_gauge_minus_one_means_prefix_caching_off() -> None:
    text = page("vllm-0.6.6.txt").replace(
        'vllm:gpu_prefix_cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.6234',
        'vllm:gpu_prefix_cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} -1.0',
    )
    assert "-1.0" in text
    assert parse(text, 0.0).hit_rate is None


def test_capacity_unknown_when_num_gpu_blocks_is_none() -> None:
    text = page("vllm-0.6.6.txt").replace('num_gpu_blocks="28123"', 'num_gpu_blocks="None"')
    assert parse(text, 0.0).kv_capacity_tokens is None


def test_capacity_falls_back_to_blocks_when_size_tokens_is_none() -> None:
    text = page("vllm-0.33.0.txt").replace(
        'kv_cache_size_tokens="196608"', 'kv_cache_size_tokens="None"'
    )
    assert parse(text, 0.0).kv_capacity_tokens == 24576 * 16


def test_engines_without_engine_label_is_one() -> None:
    assert parse(page("vllm-0.6.6.txt"), 0.0).engines == 1


def test_admission_rejections_without_engine_label_do_not_count_as_an_engine() -> None:
    text = page("vllm-0.33.0.txt")
    assert 'vllm:admission_rejections_total{model_name="google/gemma-3-27b-it"' in text
    assert parse(text, 0.0).engines == 1


@pytest.mark.parametrize(
    "garbage",
    [
        "hello world\n",
        "<html><body><h1>502 Bad Gateway</h1></body></html>",
        '{"detail": "Not Found"}',
        'vllm:num_requests_running{engine="0" 3\n',
        "\x00\x01\x02\x03",
    ],
)
def test_garbage_raises_adapter_error(garbage: str) -> None:
    with pytest.raises(AdapterError, match="not a Prometheus text exposition"):
        parse(garbage, 0.0)


@pytest.mark.parametrize("text", ["", "\n", "# EOF\n"])
def test_empty_page_is_an_error(text: str) -> None:
    with pytest.raises(AdapterError, match="no vllm:"):
        parse(text, 0.0)


def test_page_without_vllm_metrics_says_what_to_check() -> None:
    text = drop(page("vllm-0.11.0.txt"), "vllm:")
    assert "python_gc_objects_collected_total" in text
    with pytest.raises(AdapterError, match="--disable-log-stats"):
        parse(text, 0.0)


def test_only_the_metrics_read_are_parsed() -> None:
    # A broken line in a metric concur does not read (a histogram, say) no longer
    # costs the whole reading; one in a metric it reads still does.
    text = page("vllm-0.33.0.txt")
    broken = text + 'vllm:time_to_first_token_seconds_bucket{le="0.1" 3\n'
    assert parse(broken, 5.0) == parse(text, 5.0)
    with pytest.raises(AdapterError, match="not a Prometheus text exposition"):
        parse(text + 'vllm:num_requests_running{engine="9" 3\n', 5.0)


def test_infinite_values_read_as_unknown() -> None:
    text = page("vllm-0.6.6.txt")
    usage = re.compile(r"^(vllm:gpu_cache_usage_perc\{[^}]*\}) \S+$", re.M)
    preempt = re.compile(r"^(vllm:num_preemptions_total\{[^}]*\}) \S+$", re.M)
    assert usage.search(text) and preempt.search(text)
    signal = parse(preempt.sub(r"\1 +Inf", usage.sub(r"\1 +Inf", text)), 5.0)
    assert signal.kv_usage is None and signal.preemptions_total is None
    assert signal.counter_series == ()


@pytest.mark.parametrize("odd", ["\u2028", "\x85", "\x0b", "\x1c"])
def test_a_model_name_with_a_unicode_line_separator_still_parses(odd: str) -> None:
    text = page("vllm-0.11.0.txt")
    name = re.search(r'model_name="([^"]+)"', text)
    assert name is not None
    renamed = text.replace(name.group(1), f"team{odd}model")
    assert parse(renamed, 5.0).kv_usage == parse(text, 5.0).kv_usage is not None
