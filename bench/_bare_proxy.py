"""A bare pass-through proxy: the floor for any Python proxy (run as its own process).

    python bench/_bare_proxy.py --upstream http://127.0.0.1:8101 --port 8102 [--client httpx]

No admission, no body inspection, no metrics: read the request body, forward
method, path, query, end-to-end headers and body to the upstream, and relay the
response (status, headers, body chunk by chunk as it arrives). The upstream
client is aiohttp (the one concur uses) or httpx, so the benchmark can measure
which one is cheaper. Like ``concur serve``, it moves its start-up objects out of
the garbage collector's way (``gc.freeze``) once it is up, so the floor is fair.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import aiohttp
import httpx
from aiohttp import web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def _request_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


def _response_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def freeze() -> None:
    """Collect start-up garbage, then exempt everything left from future collections."""
    gc.collect()
    gc.freeze()


def aiohttp_app(upstream: str) -> web.Application:
    sessions: list[aiohttp.ClientSession] = []

    async def lifecycle(app: web.Application) -> Any:
        freeze()
        sessions.append(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        )
        yield
        await sessions[0].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with sessions[0].request(
            request.method,
            upstream + str(request.rel_url),
            headers=_request_headers(request),
            data=body or None,
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(status=up.status, headers=_response_headers(up.headers))
            await resp.prepare(request)
            while chunk := await up.content.readany():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def httpx_app(upstream: str) -> web.Application:
    clients: list[httpx.AsyncClient] = []

    async def lifecycle(app: web.Application) -> Any:
        freeze()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        clients.append(httpx.AsyncClient(limits=limits, timeout=None, trust_env=False))
        yield
        await clients[0].aclose()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        client = clients[0]
        req = client.build_request(
            request.method,
            upstream + str(request.rel_url),
            headers=_request_headers(request),
            content=body or None,
        )
        up = await client.send(req, stream=True)
        try:
            resp = web.StreamResponse(status=up.status_code, headers=_response_headers(up.headers))
            await resp.prepare(request)
            async for chunk in up.aiter_raw():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            await up.aclose()

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="bare pass-through proxy for the benchmark")
    ap.add_argument("--upstream", required=True, help="upstream base URL, no trailing slash")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    args = ap.parse_args()
    upstream = args.upstream.rstrip("/")
    app = aiohttp_app(upstream) if args.client == "aiohttp" else httpx_app(upstream)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=2048)


if __name__ == "__main__":
    main()
