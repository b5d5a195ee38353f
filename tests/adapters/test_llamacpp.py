"""llama.cpp adapter on llama-server's /slots answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from concur.adapters.errors import AdapterError
from concur.adapters.llamacpp import parse, parse_slots
from concur.adapters.signal import EngineSignal

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "metrics" / "llamacpp-slots.json"


def slots() -> list[dict[str, Any]]:
    data = json.loads(FIXTURE.read_text())
    assert isinstance(data, list)
    return data


def test_fixture() -> None:
    assert parse(FIXTURE.read_text(), 3.0) == EngineSignal(
        timestamp=3.0,
        kv_usage=(5120 + 2048) / (4 * 8192),
        running=2,
        kv_capacity_tokens=4 * 8192,
        engines=1,
    )


def test_idle_slot_cache_is_free_not_held() -> None:
    data = slots()
    assert data[2]["is_processing"] is False
    assert data[2]["n_prompt_tokens"] == 3000
    data[2]["is_processing"] = True
    signal = parse(json.dumps(data), 0.0)
    assert signal.running == 3
    assert signal.kv_usage == (5120 + 2048 + 3000) / (4 * 8192)


def test_all_idle() -> None:
    data = slots()
    for slot in data:
        slot["is_processing"] = False
    signal = parse(json.dumps(data), 0.0)
    assert (signal.running, signal.kv_usage, signal.kv_capacity_tokens) == (0, 0.0, 32768)


def test_no_slots() -> None:
    signal = parse("[]", 0.0)
    assert (signal.running, signal.kv_usage, signal.kv_capacity_tokens) == (0, None, None)


def test_legacy_state_field() -> None:
    text = json.dumps(
        [
            {"id": 0, "n_ctx": 4096, "state": 1, "n_prompt_tokens": 1024},
            {"id": 1, "n_ctx": 4096, "state": 0},
        ]
    )
    signal = parse(text, 0.0)
    assert (signal.running, signal.kv_usage, signal.kv_capacity_tokens) == (1, 0.125, 8192)


def test_processing_slot_without_token_count_makes_usage_unknown() -> None:
    text = json.dumps([{"id": 0, "n_ctx": 4096, "is_processing": True}])
    signal = parse(text, 0.0)
    assert signal.kv_usage is None
    assert signal.running == 1
    assert signal.kv_capacity_tokens == 4096


def test_waiting_and_counters_are_unknown() -> None:
    signal = parse(FIXTURE.read_text(), 0.0)
    assert signal.waiting is None
    assert signal.preemptions_total is None
    assert signal.prefix_hits_total is None
    assert signal.hit_rate is None


def test_parse_slots_reads_each_slot() -> None:
    parsed = parse_slots(FIXTURE.read_text())
    assert [(s.n_ctx, s.processing, s.tokens) for s in parsed] == [
        (8192, True, 5120),
        (8192, True, 2048),
        (8192, False, 3000),
        (8192, False, None),
    ]


def test_no_slots_endpoint_error_object() -> None:
    text = json.dumps(
        {
            "error": {
                "code": 501,
                "message": "This server does not support slots endpoint.",
                "type": "not_supported_error",
            }
        }
    )
    with pytest.raises(AdapterError, match=r"does not support slots endpoint\. \(code 501\)"):
        parse(text, 0.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("<html></html>", "not JSON"),
        ("[" * 100_000, "not JSON"),
        ('{"slots": []}', "JSON dict, expected a list"),
        ("[1]", "entry 0 is not an object"),
        ('[{"id": 0, "is_processing": true}]', "entry 0 has no n_ctx"),
        ('[{"n_ctx": "4096", "is_processing": true}]', "n_ctx is '4096'"),
        ('[{"n_ctx": -1, "is_processing": true}]', "non-negative integer"),
        ('[{"n_ctx": 4096, "is_processing": "yes"}]', "is_processing is 'yes'"),
        ('[{"n_ctx": 4096}]', "neither is_processing nor state"),
        ('[{"n_ctx": 4096, "is_processing": true, "n_prompt_tokens": 1.5}]', "n_prompt_tokens"),
    ],
)
def test_bad_answers_raise_adapter_error(text: str, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        parse(text, 0.0)
