"""A faulty hop for the soak (run as its own process): a pass-through that sometimes breaks.

    python bench/_faulty_hop.py --upstream http://127.0.0.1:8000 --port 8101 --rate 0.02

It sits between concur and the engine and forwards every request as it came. A
generation request (``POST /v1/chat/completions`` or ``/v1/completions``) that carries
an ``X-Soak-Id`` header is broken with probability ``--rate`` (seeded), one fault
kind drawn at random:

``500`` / ``503``
    answer that status with a JSON error body (:data:`ERROR_BODIES`), engine untouched;
``reset``
    close the connection before any response;
``stall``
    never answer (until concur gives up and closes the connection);
``midstream``
    forward to the engine, relay half of the first body chunk, then close.

``GET /soak/faults`` returns ``{soak_id: kind}`` for every fault injected, so the soak
can check that each client saw exactly the answer its fault calls for. Relayed
responses carry ``X-Soak-Hop-In`` and ``X-Soak-Hop-Out`` (``time.monotonic()`` when
the request arrived here and when the engine's headers came back), from which the
soak separates the engine's time from the time added in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

KINDS = ("500", "503", "reset", "stall", "midstream")
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
ERROR_BODIES = {
    status: json.dumps(
        {
            "object": "error",
            "message": f"soak: injected engine error {status}",
            "type": "InternalServerError",
            "param": None,
            "code": status,
        }
    ).encode()
    for status in (500, 503)
}
_SKIP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
HOP = web.AppKey("soak_hop", "FaultyHop")


def _headers(src: CIMultiDict[str] | object) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in src.items():  # type: ignore[attr-defined]
        if name.lower() not in _SKIP:
            out.add(name, value)
    return out


class FaultyHop:
    """The hop's state: the engine session, the random source, the faults injected."""

    def __init__(self, upstream: str, rate: float, seed: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.rng = random.Random(seed)
        self.faults: dict[str, str] = {}
        self.session: aiohttp.ClientSession | None = None

    def draw(self, request: web.Request) -> str | None:
        sid = request.headers.get("X-Soak-Id")
        if sid is None or request.method != "POST" or request.path not in GENERATION_PATHS:
            return None
        if self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(KINDS)
        self.faults[sid] = kind
        return kind

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = self.draw(request)
        body = await request.read()
        hop_in = time.monotonic()
        if kind in ("500", "503"):
            status = int(kind)
            extra = {"Retry-After": "1"} if status == 503 else {}
            return web.Response(
                status=status,
                body=ERROR_BODIES[status],
                content_type="application/json",
                headers=extra,
            )
        if kind in ("reset", "stall"):
            if kind == "reset" and request.transport is not None:
                request.transport.close()
            await asyncio.Event().wait()  # until the caller goes away
        assert self.session is not None
        async with self.session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=_headers(request.headers),
            data=body if body else None,
            allow_redirects=False,
        ) as up:
            headers = _headers(up.headers)
            headers["X-Soak-Hop-In"] = f"{hop_in:.6f}"
            headers["X-Soak-Hop-Out"] = f"{time.monotonic():.6f}"
            resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
            try:
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    if kind == "midstream":
                        await resp.write(chunk[: max(1, len(chunk) // 2)])
                        if request.transport is not None:
                            request.transport.close()
                        return resp
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionResetError:  # concur went away (its client hung up)
                pass
            return resp


async def _faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[HOP].faults)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def serve(upstream: str, port: int, rate: float, seed: int) -> None:
    hop = FaultyHop(upstream, rate, seed)
    app = web.Application(client_max_size=64 << 20)
    app[HOP] = hop

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        hop.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            trust_env=False,
        )
        yield
        await hop.session.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/soak/faults", _faults)
    app.router.add_get("/soak/health", _health)
    app.router.add_route("*", "/{tail:.*}", hop.handle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="the engine's base URL")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0.02, help="share of requests to break")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.upstream, args.port, args.rate, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
