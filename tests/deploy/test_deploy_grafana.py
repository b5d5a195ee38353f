"""deploy/grafana/concur.json: loads, is well formed, and queries only metrics that exist.

concur's metric names come from a real concur (``build_app`` on a loopback port, in front
of the fake vLLM) serving ``/metrics``; vLLM's from the vLLM 0.33 metrics fixture.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from deploy_support import (
    DASHBOARD,
    VLLM_FIXTURE,
    promql_metric_names,
    variable_query_metric_names,
)
from fakes.fake_vllm import FakeVLLM
from fakes.harness import AGENT, DONE, FAST, chat, wait_for
from prometheus_client.parser import text_string_to_metric_families

from concur import _views
from concur.app import RUNTIME, Server, build_app
from concur.config import load_settings
from concur.metrics import ConcurMetrics

Obj = dict[str, Any]


def dashboard() -> Obj:
    data: Obj = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[Obj]) -> Iterator[Obj]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def exprs(dash: Obj) -> list[str]:
    return [t["expr"] for p in all_panels(dash["panels"]) for t in p.get("targets", [])]


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def declared_names(metrics: ConcurMetrics) -> set[str]:
    """Every series name concur's registry can export, labelled children or not yet."""
    names = set()
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


async def served_concur_names() -> set[str]:
    """Sample names a real concur serves on /metrics after forwarding one request and one
    control tick with an engine signal (the pressure's parts exist from then on)."""
    async with FakeVLLM() as fake:
        settings = load_settings(overrides={**FAST, "upstream.url": fake.url}, env={})
        server = Server(build_app(settings), "127.0.0.1", 0, drain_timeout=1.0)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, trust_env=False) as client:
                resp = await client.post(
                    "/v1/chat/completions", json=chat(), headers={AGENT: "a1", **DONE}
                )
                assert resp.status_code == 200, resp.text
                runtime = server.app[RUNTIME]
                await wait_for(
                    lambda: bool(_views.status(runtime).pressure_parts), what="a tick with a signal"
                )
                resp = await client.get("/metrics")
                assert resp.status_code == 200
                return sample_names(resp.text)
        finally:
            await server.stop()


@pytest.fixture
async def known_names() -> set[str]:
    served = await served_concur_names()
    declared = declared_names(ConcurMetrics())
    concur = {n for n in served if n.startswith("concur_")}
    assert concur == declared, f"served {sorted(concur ^ declared)} differ from the registry"
    vllm = sample_names(VLLM_FIXTURE.read_text())
    assert "vllm:kv_cache_usage_perc" in vllm and "concur_window" in served
    return served | vllm


# --------------------------------------------------------------------------- extractor


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("concur_window", {"concur_window"}),
        (
            'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~"$i", y="b{c}"}[$__interval])))',
            {"a_bucket"},
        ),
        (
            "sum by (model_name) (rate(vllm:hits_total[5m])) / ignoring (x) group_left vllm:q",
            {"vllm:hits_total", "vllm:q"},
        ),
        ("vector($high)", set()),
        ("max(a) > bool 1e3 offset 5m and on (pod) b", {"a", "b"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_variable_query_metric_names() -> None:
    assert variable_query_metric_names('label_values(vllm:x{a="b"}, model_name)') == {"vllm:x"}
    with pytest.raises(ValueError, match="label_values"):
        variable_query_metric_names("query_result(up)")


# ------------------------------------------------------------------------- dashboard


async def test_every_metric_in_the_dashboard_exists(known_names: set[str]) -> None:
    dash = dashboard()
    used: dict[str, str] = {}
    for expr in exprs(dash):
        for name in promql_metric_names(expr):
            used.setdefault(name, expr)
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            for name in variable_query_metric_names(query):
                used.setdefault(name, query)
    unknown = {name: expr for name, expr in used.items() if name not in known_names}
    assert not unknown, "metrics neither concur nor vLLM exports:\n" + "\n".join(
        f"  {n} in {e}" for n, e in sorted(unknown.items())
    )
    assert len(used) >= 15


async def test_a_made_up_metric_would_be_caught(known_names: set[str]) -> None:
    names = promql_metric_names("rate(concur_admission_total[5m]) + vllm:gpu_cache_usage_perc")
    assert names and not names <= known_names


def test_dashboard_covers_the_story() -> None:
    used = set().union(*(promql_metric_names(e) for e in exprs(dashboard())))
    required = {
        # window vs active vs queued agents
        "concur_window",
        "concur_agents_active",
        "concur_agents_queued",
        # pressure and its parts
        "concur_pressure",
        "concur_engine_kv_usage",
        # KV usage, prefix hit rate, preemption rate (the engine's own view)
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:num_preemptions_total",
        # queue wait percentiles, admissions by outcome, upstream latency
        "concur_queue_wait_seconds_bucket",
        "concur_admissions_total",
        "concur_upstream_latency_seconds_bucket",
    }
    assert required <= used, sorted(required - used)
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard()["panels"]))
    for words in ("window", "queued", "pressure", "threshold", "kv", "hit rate", "preemption"):
        assert words in titles, words
    for words in ("queue wait", "outcome", "upstream latency"):
        assert words in titles, words


def test_thresholds_are_drawn_from_variables() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["high"]["query"] == "0.85" and variables["low"]["query"] == "0.7"
    pressure = next(p for p in dash["panels"] if p["title"].startswith("Pressure and"))
    assert {t["expr"] for t in pressure["targets"]} >= {"vector($high)", "vector($low)"}


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "concur-overview" and dash["title"] == "concur"
    assert isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and refs, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        for t in p["targets"]:
            expr = t["expr"]
            for a, b in ("()", "[]", "{}"):
                assert expr.count(a) == expr.count(b), f"unbalanced {a}{b}: {expr}"
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, expr
            for name in promql_metric_names(expr):
                if name.startswith("concur_"):
                    assert '{instance=~"$instance"' in expr, expr
                elif name.startswith("vllm:"):
                    assert '{model_name=~"$model"' in expr, expr
