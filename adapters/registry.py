"""Which adapter reads which engine, and the thin async scrape around it.

An :class:`Adapter` pairs an engine kind with the path of the page that
describes the engine's state and the pure function that reads that page.
:func:`scrape` is the only I/O in this package: one GET with the caller's
``httpx.AsyncClient``, every failure turned into an
:class:`~concur.adapters.errors.AdapterError` whose message names the URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from concur.adapters import llamacpp, sglang, vllm
from concur.adapters.errors import AdapterError, ScrapeError
from concur.adapters.signal import EngineSignal

ParseFn = Callable[[str, float], EngineSignal]
"""``parse(text, timestamp) -> EngineSignal``; raises AdapterError on bad input."""

KINDS = ("vllm", "sglang", "llamacpp")
"""The engine kinds concur can read, as accepted by :func:`get_adapter`."""

MAX_PAGE_BYTES = 32 << 20
"""A state page larger than this is refused (a vLLM page with 8 DP ranks is well under 1 MB)."""


@dataclass(frozen=True, slots=True)
class Adapter:
    """How to read one kind of engine."""

    kind: str
    """``"vllm"``, ``"sglang"`` or ``"llamacpp"``."""
    metrics_path: str
    """Path of the state page on the engine's server, e.g. ``"/metrics"``."""
    parse: ParseFn
    """Reads that page (text) into a signal stamped with the given time."""
    description: str


def all_adapters() -> tuple[Adapter, ...]:
    """Every known adapter, in the order of :data:`KINDS`."""
    return (
        Adapter("vllm", "/metrics", vllm.parse, "vLLM, Prometheus /metrics (0.6 and later)"),
        Adapter("sglang", "/metrics", sglang.parse, "SGLang, Prometheus /metrics"),
        Adapter("llamacpp", "/slots", llamacpp.parse, "llama.cpp llama-server, JSON /slots"),
    )


def get_adapter(kind: str) -> Adapter:
    """The adapter for ``kind`` (case, ``-``, ``_`` and ``.`` ignored: ``"llama.cpp"`` works).

    Raises:
        ValueError: unknown kind; the message lists the known ones.
    """
    wanted = kind.strip().lower().replace("-", "").replace("_", "").replace(".", "")
    for adapter in all_adapters():
        if adapter.kind == wanted:
            return adapter
    raise ValueError(f"unknown engine kind {kind!r}: expected one of {', '.join(KINDS)}")


def metrics_url(base_url: str, adapter: Adapter) -> str:
    """The state page's URL; ``base_url`` is the server root, e.g. ``http://127.0.0.1:8000``."""
    return base_url.rstrip("/") + adapter.metrics_path


async def scrape(
    client: httpx.AsyncClient,
    base_url: str,
    adapter: Adapter,
    timestamp: float,
    *,
    request_timeout: float | None = None,
) -> EngineSignal:
    """GET the engine's state page and parse it into a signal stamped ``timestamp``.

    ``request_timeout`` (seconds) bounds the whole request, body included (httpx's
    own timeouts bound each connect or read, so a page that trickles in would not
    end), and overrides the client's timeout.

    Raises:
        ScrapeError: the request failed (refused, timed out, status not 2xx, a page
            over :data:`MAX_PAGE_BYTES`).
        AdapterError: the answer could not be read.
    """
    url = metrics_url(base_url, adapter)
    try:
        async with asyncio.timeout(request_timeout):
            status, reason, text = await _get(client, url, request_timeout)
    except TimeoutError as exc:
        raise ScrapeError(
            f"GET {url}: timed out after {request_timeout:g} s with no complete page "
            "(engine.poll_timeout)"
        ) from exc
    except httpx.TimeoutException as exc:
        after = f" after {request_timeout:g} s" if request_timeout is not None else ""
        raise ScrapeError(f"GET {url}: timed out{after} ({type(exc).__name__})") from exc
    except httpx.ConnectError as exc:
        raise ScrapeError(f"GET {url}: cannot connect ({str(exc) or type(exc).__name__})") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ScrapeError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
    if not 200 <= status < 300:
        body = " ".join(text.split())[:120]
        raise ScrapeError(f"GET {url}: HTTP {status} {reason}" + (f": {body}" if body else ""))
    try:
        return adapter.parse(text, timestamp)
    except AdapterError as exc:
        raise AdapterError(f"GET {url}: {exc}") from exc


async def _get(
    client: httpx.AsyncClient, url: str, request_timeout: float | None
) -> tuple[int, str, str]:
    """Status, reason and body text of ``GET url``, reading at most :data:`MAX_PAGE_BYTES`."""
    kwargs = {} if request_timeout is None else {"timeout": request_timeout}
    async with client.stream("GET", url, **kwargs) as response:  # type: ignore[arg-type]
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_PAGE_BYTES:
                raise ScrapeError(
                    f"GET {url}: the page is over {MAX_PAGE_BYTES >> 20} MiB; "
                    "is this the engine's metrics endpoint?"
                )
        text = body.decode(response.encoding or "utf-8", errors="replace")
        return response.status_code, response.reason_phrase, text
