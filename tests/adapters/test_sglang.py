"""SGLang adapter on real page shapes (DP, priority scheduling) and on traps."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from concur.adapters.errors import AdapterError
from concur.adapters.sglang import parse
from concur.adapters.signal import EngineSignal

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"

LABELS = 'engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0"'


def page(name: str) -> str:
    return (FIXTURES / name).read_text()


def reverse_labels(text: str) -> str:
    """The same page with every sample's labels in reverse order."""
    sample = re.compile(r"^(?P<name>[^\s{#]+)\{(?P<labels>.*)\}(?P<rest>\s.*)$")
    label = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
    out = []
    for line in text.splitlines():
        match = sample.match(line)
        if match:
            pairs = label.findall(match["labels"])
            labels = ",".join(f'{k}="{v}"' for k, v in reversed(pairs))
            line = f"{match['name']}{{{labels}}}{match['rest']}"
        out.append(line)
    return "\n".join(out) + "\n"


def test_dp2_fixture() -> None:
    signal = parse(page("sglang-0.5.23-dp2.txt"), 7.0)
    assert [(key[1], v) for _, key, v in signal.counter_series] == [("0", 4.0), ("1", 1.0)]
    assert replace(signal, counter_series=()) == EngineSignal(
        timestamp=7.0,
        kv_usage=0.66,  # max(0.42, 0.66)
        running=12,  # 5 + 7
        waiting=2,  # 2 + 0
        preemptions_total=5.0,  # counter 4 + 1; the gauge (0 and 1) is ignored
        hit_rate=pytest.approx(0.63),  # mean(0.71, 0.55)
        kv_capacity_tokens=1_000_000,  # 2 x 500000
        engines=2,
    )


def test_priority_breakdown_is_not_counted_twice() -> None:
    signal = parse(page("sglang-0.5.23-priority.txt"), 7.0)
    assert [v for _, _, v in signal.counter_series] == [17.0]  # the total, not its breakdown
    assert replace(signal, counter_series=()) == EngineSignal(
        timestamp=7.0,
        kv_usage=0.93,
        running=6,  # priority="" total; the "0" and "10" breakdown (4 + 2) is skipped
        waiting=11,  # not 11 + 8 + 3
        preemptions_total=17.0,
        hit_rate=0.38,
        kv_capacity_tokens=282624,
        engines=1,
    )


@pytest.mark.parametrize("name", ["sglang-0.5.23-dp2.txt", "sglang-0.5.23-priority.txt"])
def test_label_order_does_not_matter(name: str) -> None:
    reordered = reverse_labels(page(name))
    assert reordered != page(name)
    assert parse(reordered, 1.0) == parse(page(name), 1.0)


def test_retracted_gauge_alone_is_not_a_counter() -> None:
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        f'sglang:num_running_reqs{{{LABELS},tp_rank="0"}} 3.0\n'
        "# TYPE sglang:num_retracted_reqs gauge\n"
        f'sglang:num_retracted_reqs{{{LABELS},pid="12",tp_rank="0"}} 4.0\n'
    )
    signal = parse(text, 0.0)
    assert signal.preemptions_total is None
    assert signal.running == 3


def test_tensor_parallel_ranks_reporting_the_same_scheduler_are_not_summed() -> None:
    # --enable-metrics-for-all-schedulers: every TP rank reports the same DP group.
    text = "".join(
        f'sglang:num_running_reqs{{{LABELS},tp_rank="{rank}"}} 8.0\n'
        f'sglang:token_usage{{{LABELS},tp_rank="{rank}"}} 0.5\n'
        for rank in range(4)
    )
    signal = parse(text, 0.0)
    assert signal.running == 8
    assert signal.kv_usage == 0.5
    assert signal.engines == 1


def test_missing_metrics_read_as_none() -> None:
    text = f'sglang:num_queue_reqs{{{LABELS},tp_rank="0"}} 0.0\n'
    signal = parse(text, 0.0)
    assert signal.waiting == 0
    assert signal.kv_usage is None
    assert signal.running is None
    assert signal.hit_rate is None
    assert signal.kv_capacity_tokens is None
    assert signal.preemptions_total is None


@pytest.mark.parametrize("garbage", ["hello world\n", "<html>502</html>", '{"error": 1}'])
def test_garbage_raises_adapter_error(garbage: str) -> None:
    with pytest.raises(AdapterError, match="SGLang metrics page is not a Prometheus"):
        parse(garbage, 0.0)


def test_a_vllm_page_is_not_an_sglang_page() -> None:
    with pytest.raises(AdapterError, match="no sglang:"):
        parse(page("vllm-0.11.0.txt"), 0.0)
