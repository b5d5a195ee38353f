"""``concur engine``'s ``/metrics``: vLLM's shape, read by concur's vLLM adapter, and
values that move with load."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from concur.adapters.signal import EngineSignal
from concur.sim.server.tokenizer import filler_text

if TYPE_CHECKING:
    from conftest import Engine, StartEngine

FIXTURE = Path(__file__).parents[1] / "fixtures" / "metrics" / "vllm-0.33.0.txt"
BS = 16


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


async def wait_until(engine: Engine, pred: Callable[[EngineSignal], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while not pred(await engine.signal()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def chat(engine: Engine, seed: str, tokens: int, max_tokens: int) -> Any:
    return engine.openai.chat.completions.create(
        model=engine.model,
        messages=[{"role": "user", "content": filler_text(tokens, seed=seed)}],
        max_tokens=max_tokens,
    )


async def test_the_page_has_vllm_v1_names_types_help_and_labels(engine: Engine) -> None:
    resp = await engine.http.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    ours = families(resp.text)
    vllm = families(FIXTURE.read_text())
    for name in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_preemptions",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:cache_config_info",
    ):
        assert name in ours, name
    for name, family in ours.items():
        assert name in vllm, f"{name} is not a vLLM 0.33 metric"
        theirs = vllm[name]
        assert (family.type, family.documentation) == (theirs.type, theirs.documentation), name
        if name == "vllm:cache_config_info":
            assert set(family.samples[0].labels) <= set(theirs.samples[0].labels)
            continue
        their_labels = {s.name: set(s.labels) for s in theirs.samples}
        assert {s.name for s in family.samples} == set(their_labels), name
        for s in family.samples:
            assert set(s.labels) == their_labels[s.name], s.name
            assert s.labels["engine"] == "0"
            assert s.labels["model_name"] == engine.model
    info = ours["vllm:cache_config_info"].samples[0]
    assert info.value == 1.0
    assert info.labels["num_gpu_blocks"] == str(50_000 // BS)
    assert info.labels["block_size"] == "16"
    assert info.labels["kv_cache_size_tokens"] == "50000"
    assert info.labels["enable_prefix_caching"] == "True"

    signal = await engine.signal()
    assert signal.kv_capacity_tokens == 50_000
    assert signal.engines == 1
    assert (signal.kv_usage, signal.running, signal.waiting) == (0.0, 0, 0)
    assert signal.preemptions_total == 0.0
    assert (signal.prefix_hits_total, signal.prefix_queries_total) == (0.0, 0.0)


async def test_kv_usage_and_running_rise_under_load_and_fall_after(
    start_engine: StartEngine,
) -> None:
    engine = await start_engine(kv_tokens=20_000, speed=4.0)
    n, prompt, out = 8, 500, 250
    tasks = [asyncio.create_task(chat(engine, f"load{i}", prompt, out)) for i in range(n)]
    await wait_until(engine, lambda s: s.running == n, f"{n} running requests")
    loaded = await engine.signal()
    assert loaded.kv_usage is not None
    # Every running request holds at least its prompt's blocks.
    assert loaded.kv_usage >= n * (prompt // BS) / (20_000 // BS - 1)
    results = await asyncio.gather(*tasks)
    assert all(r.usage.completion_tokens == out for r in results)
    idle = await engine.signal()
    assert (idle.kv_usage, idle.running, idle.waiting) == (0.0, 0, 0)
    text = (await engine.http.get("/metrics")).text
    prompt_tokens = sum(r.usage.prompt_tokens for r in results)
    assert sample(text, "vllm:prompt_tokens_total") == prompt_tokens
    assert sample(text, "vllm:generation_tokens_total") == n * out
    assert sample(text, "vllm:request_success_total", finished_reason="length") == n
    assert sample(text, "vllm:time_to_first_token_seconds_count") == n
    assert sample(text, "vllm:e2e_request_latency_seconds_count") == n
    assert sample(text, "vllm:e2e_request_latency_seconds_sum") > 0


async def test_preemptions_appear_when_the_cache_is_over_committed(
    start_engine: StartEngine,
) -> None:
    """Six requests whose prompts fit together but whose outputs do not: 6 x (300 +
    300) tokens in a 2,048-token cache. Decoding runs out of blocks: recompute
    preemptions, and every request still completes."""
    engine = await start_engine(kv_tokens=2048, speed=200.0)
    results = await asyncio.gather(*(chat(engine, f"pre{i}", 295, 300) for i in range(6)))
    assert all(r.usage.completion_tokens == 300 for r in results)
    signal = await engine.signal()
    assert signal.preemptions_total is not None and signal.preemptions_total > 0
    assert (signal.kv_usage, signal.running, signal.waiting) == (0.0, 0, 0)
    stats = await engine.stats()
    assert stats["stats"]["preemptions"] == signal.preemptions_total


async def test_hit_rate_falls_when_prefixes_are_evicted(start_engine: StartEngine) -> None:
    """One agent re-sending its context hits; twelve agents cycling through a cache
    that holds six of them evict each other (LRU) and miss."""
    engine = await start_engine(kv_tokens=4096, speed=200.0)

    async def turns(agents: int, rounds: int, tag: str) -> tuple[float, float]:
        """Run the agents round-robin; (hits, queries) of the last round."""
        histories = [
            [{"role": "system", "content": filler_text(600, seed=f"{tag}{a}")}]
            for a in range(agents)
        ]
        before = await engine.signal()
        for r in range(rounds):
            if r == rounds - 1:
                before = await engine.signal()
            for a, history in enumerate(histories):
                history.append({"role": "user", "content": filler_text(20, seed=f"{tag}{a}-{r}")})
                resp = await engine.openai.chat.completions.create(
                    model=engine.model, messages=history, max_tokens=8
                )
                history.append({"role": "assistant", "content": resp.choices[0].message.content})
        after = await engine.signal()
        assert after.prefix_hits_total is not None and before.prefix_hits_total is not None
        assert after.prefix_queries_total is not None and before.prefix_queries_total is not None
        return (
            after.prefix_hits_total - before.prefix_hits_total,
            after.prefix_queries_total - before.prefix_queries_total,
        )

    hits, queries = await turns(agents=1, rounds=3, tag="warm")
    warm = hits / queries
    hits, queries = await turns(agents=12, rounds=2, tag="thrash")
    thrash = hits / queries
    assert warm > 0.9
    assert thrash < 0.1
    stats = await engine.stats()
    assert stats["stats"]["evicted_blocks"] > 0
    assert stats["stats"]["recomputed_tokens"] > 12 * 500


async def test_each_server_has_its_own_registry(start_engine: StartEngine) -> None:
    a = await start_engine()
    b = await start_engine()
    await chat(a, "only-a", 50, 3)
    assert (await a.signal()).prefix_queries_total == 50 + 3
    assert (await b.signal()).prefix_queries_total == 0.0
