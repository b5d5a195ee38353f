"""Adapter registry and the async scrape, against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from concur.adapters import (
    KINDS,
    AdapterError,
    ScrapeError,
    all_adapters,
    get_adapter,
    llamacpp,
    scrape,
    sglang,
    vllm,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"


class Engine:
    """A loopback HTTP server answering /metrics and /slots as told."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.metrics = (FIXTURES / "vllm-0.11.0.txt").read_text()
        self.slots = (FIXTURES / "llamacpp-slots.json").read_text()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.mode == "error":
            return web.Response(status=500, text="Internal Server Error\n")
        if self.mode == "garbage":
            return web.Response(text="<html><body>hello</body></html>", content_type="text/html")
        if self.mode == "slow":
            await self.release.wait()
        if request.path == "/slots":
            return web.Response(text=self.slots, content_type="application/json")
        return web.Response(text=self.metrics, content_type="text/plain")


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    server = Engine()
    app = web.Application()
    app.router.add_get("/metrics", server.handle)
    app.router.add_get("/slots", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    yield server
    server.release.set()
    await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_kinds_and_paths() -> None:
    assert KINDS == ("vllm", "sglang", "llamacpp")
    assert [(a.kind, a.metrics_path) for a in all_adapters()] == [
        ("vllm", "/metrics"),
        ("sglang", "/metrics"),
        ("llamacpp", "/slots"),
    ]
    assert get_adapter("vllm").parse is vllm.parse
    assert get_adapter("sglang").parse is sglang.parse
    assert get_adapter("llamacpp").parse is llamacpp.parse


@pytest.mark.parametrize(
    ("spelling", "kind"),
    [
        ("vLLM", "vllm"),
        (" SGLang ", "sglang"),
        ("llama.cpp", "llamacpp"),
        ("llama-cpp", "llamacpp"),
    ],
)
def test_get_adapter_is_lenient_about_spelling(spelling: str, kind: str) -> None:
    assert get_adapter(spelling).kind == kind


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown engine kind 'tgi': expected one of vllm, sglang"):
        get_adapter("tgi")


async def test_scrape_vllm(engine: Engine) -> None:
    async with httpx.AsyncClient() as client:
        signal = await scrape(client, engine.url + "/", get_adapter("vllm"), 42.0)
    assert signal.timestamp == 42.0
    assert signal.kv_usage == 0.8125
    assert signal.running == 12


async def test_scrape_llamacpp_uses_slots(engine: Engine) -> None:
    async with httpx.AsyncClient() as client:
        signal = await scrape(client, engine.url, get_adapter("llama.cpp"), 1.0)
    assert signal.running == 2
    assert signal.kv_capacity_tokens == 32768


async def test_scrape_http_error(engine: Engine) -> None:
    engine.mode = "error"
    async with httpx.AsyncClient() as client:
        with pytest.raises(ScrapeError, match=r"/metrics: HTTP 500 Internal Server Error"):
            await scrape(client, engine.url, get_adapter("vllm"), 1.0)


async def test_scrape_garbage_names_the_url(engine: Engine) -> None:
    engine.mode = "garbage"
    async with httpx.AsyncClient() as client:
        with pytest.raises(AdapterError) as info:
            await scrape(client, engine.url, get_adapter("vllm"), 1.0)
    assert not isinstance(info.value, ScrapeError)
    assert str(info.value).startswith(f"GET {engine.url}/metrics: the vLLM metrics page is not")


async def test_scrape_timeout(engine: Engine) -> None:
    engine.mode = "slow"
    async with httpx.AsyncClient() as client:
        with pytest.raises(ScrapeError, match=r"timed out after 0\.2 s"):
            await scrape(client, engine.url, get_adapter("vllm"), 1.0, request_timeout=0.2)


async def test_scrape_connection_refused() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with httpx.AsyncClient() as client:
        with pytest.raises(ScrapeError, match="cannot connect"):
            await scrape(client, url, get_adapter("vllm"), 1.0)


async def test_scrape_bad_url() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(ScrapeError, match="GET localhost:8000/metrics"):
            await scrape(client, "localhost:8000", get_adapter("vllm"), 1.0)
