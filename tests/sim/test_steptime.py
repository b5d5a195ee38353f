"""Roofline step time, presets and KV capacity."""

from __future__ import annotations

import pytest

from concur.sim.steptime import (
    GIB,
    MIB,
    MeasuredStepTime,
    ModelSpec,
    StepTimeModel,
    build_step_time,
    get_gpu,
    get_model,
    kv_capacity_tokens,
)


def test_kv_bytes_per_token_of_presets() -> None:
    assert get_model("llama-3-8b").kv_bytes_per_token == 128 * 1024
    assert get_model("qwen3-8b").kv_bytes_per_token == 144 * 1024
    assert get_model("qwen3-32b").kv_bytes_per_token == 256 * 1024
    assert get_model("deepseek-v3").kv_bytes_per_token == (512 + 64) * 61 * 2 == 70272
    ds = get_model("DeepSeek-V3")
    assert ds.weight_bytes == 671e9  # fp8: one byte per parameter
    assert ds.active_params == 37e9


def test_lookup_is_case_insensitive_and_errors_list_names() -> None:
    assert get_model("Qwen3-32B").name == "qwen3-32b"
    assert get_model("LLAMA3-8B").name == "llama-3-8b"
    assert get_gpu(" H100 ").name == "h100"
    assert get_gpu("a100").bandwidth == 2.04e12
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*deepseek-v3, llama-3-8b"):
        get_model("gpt-5")
    with pytest.raises(ValueError, match=r"unknown GPU 'v100'.*a100, h100, h200"):
        get_gpu("v100")


def test_decode_step_is_memory_bound() -> None:
    m = build_step_time("llama-3-8b", "h100", bandwidth_efficiency=0.8, overhead_s=0.002)
    # 8.03e9 params x 2 bytes read at 3.35e12 x 0.8 B/s, plus 10 x 1000 context
    # tokens x 128 KiB of KV.
    expected = (8.03e9 * 2 + 10_000 * 131072) / (3.35e12 * 0.8) + 0.002
    assert m.duration(10, 10_000) == pytest.approx(expected, rel=1e-12)
    assert m.duration(0, 0) == 0.0


def test_big_prefill_step_is_compute_bound() -> None:
    m = build_step_time("qwen3-32b", "h100", flops_efficiency=0.5, overhead_s=0.0)
    t = m.duration(8192, 8192)
    assert t == pytest.approx(2 * 32.8e9 * 8192 / (989e12 * 0.5), rel=1e-12)
    assert t > (32.8e9 * 2 + 8192 * 262144) / (3.35e12 * 0.8)


def test_tensor_parallel_shards_weights_and_kv() -> None:
    one = build_step_time("qwen3-32b", "h100", tp=1)
    two = build_step_time("qwen3-32b", "h100", tp=2, tp_efficiency=0.9)
    assert two.weight_bytes == one.weight_bytes / 2
    assert two.kv_bytes_per_token == one.kv_bytes_per_token / 2
    assert two.bandwidth == pytest.approx(one.bandwidth * 0.9)
    assert two.flops_per_token == one.flops_per_token / 2
    # 8 KV heads cannot be split over more than 8 GPUs.
    assert build_step_time("qwen3-32b", "h100", tp=16).kv_bytes_per_token == 262144 / 8
    # MLA's latent KV is replicated on every GPU.
    assert build_step_time("deepseek-v3", "h200", tp=8).kv_bytes_per_token == 70272
    # Decode on two GPUs is faster but not twice as fast.
    ratio = one.duration(64, 64 * 4000) / two.duration(64, 64 * 4000)
    assert 1.5 < ratio < 2.0


def test_kv_capacity_from_memory() -> None:
    per_gpu = 81559 * MIB * 0.9 - 32.8e9 * 2 / 2 - 2 * GIB
    expected = int(per_gpu // (262144 / 2))
    assert kv_capacity_tokens("qwen3-32b", "h100", tp=2) == expected
    assert 300_000 < expected < 340_000
    assert kv_capacity_tokens("llama-3-8b", "h100") == int(
        (81559 * MIB * 0.9 - 8.03e9 * 2 - 2 * GIB) // 131072
    )
    ds = kv_capacity_tokens("deepseek-v3", "h200", tp=8)
    assert ds == int((143771 * MIB * 0.9 - 671e9 / 8 - 2 * GIB) // 70272)


def test_errors_are_actionable() -> None:
    with pytest.raises(ValueError, match=r"does not fit on 1 x h100.*raise tp"):
        kv_capacity_tokens("deepseek-v3", "h100", tp=1)
    with pytest.raises(ValueError, match="tp"):
        build_step_time("llama-3-8b", "h100", tp=0)
    with pytest.raises(ValueError, match="flops_efficiency"):
        build_step_time("llama-3-8b", "h100", flops_efficiency=1.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_capacity_tokens("llama-3-8b", "h100", gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="overhead_s"):
        StepTimeModel(1.0, 1.0, 1.0, 1.0, 1.0, overhead_s=-1.0)


def test_custom_model_spec_passes_through() -> None:
    tiny = ModelSpec.gqa("tiny", num_layers=2, num_kv_heads=1, head_dim=64, params=1e6)
    assert tiny.kv_bytes_per_token == 2 * 2 * 1 * 64 * 2
    assert get_model(tiny) is tiny
    m = build_step_time(tiny, "a100", overhead_s=0.0)
    assert m.duration(1, 0) == pytest.approx(max(2e6 / (2.04e12 * 0.8), 2e6 / (312e12 * 0.5)))


def test_measured_step_time_adds_its_costs() -> None:
    m = MeasuredStepTime(
        base_s=0.002, per_token_s=1e-5, per_seq_s=1e-4, per_pair_s=1e-8, per_kv_s=1e-7
    )
    # A pure decode step of 4 sequences over 8,000 tokens of context.
    assert m.duration(4, 8000) == pytest.approx(0.002 + 4e-5 + 4e-4 + 8e-4)
    # A prefill chunk of 2,048 tokens after 4,096 computed ones, beside 2 decoding
    # sequences over 1,000 tokens: pairs are the chunk's, the KV read the decodes'.
    pairs = 2048 * 4096 + 2048 * 2049 // 2
    got = m.duration(2050, 4096 + 2048 + 1000, pairs, 4096 + 2048, 3)
    assert got == pytest.approx(0.002 + 2050e-5 + 3e-4 + pairs * 1e-8 + 1000e-7)
    assert m.duration(0, 0) == 0.0
    with pytest.raises(ValueError, match="per_pair_s must be >= 0"):
        MeasuredStepTime(base_s=0, per_token_s=0, per_seq_s=0, per_pair_s=-1, per_kv_s=0)


def test_the_roofline_ignores_what_only_a_measured_model_reads() -> None:
    m = build_step_time("llama-3-8b", "h100")
    assert m.duration(2048, 6144, 10**9, 6144, 1) == m.duration(2048, 6144)
