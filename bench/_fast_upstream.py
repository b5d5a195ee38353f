"""A fast fake OpenAI-compatible engine for the proxy benchmark (run as its own process).

    python bench/_fast_upstream.py --port 8101

``POST /v1/chat/completions`` (and ``/v1/completions``) answers a streaming request
with a short SSE completion, written as separate chunks with no artificial delay:
``--chunks`` content events, a usage-only event when the request asked for
``stream_options.include_usage``, then ``data: [DONE]``. A non-streaming request gets
one JSON completion with ``usage``. ``GET /metrics`` serves a quiet vLLM-style
exposition (KV usage 0.1), so a proxy polling it sees a fresh, healthy signal;
``GET /health`` and ``GET /v1/models`` answer too. Every event is built once at
start-up, so the upstream spends its CPU on HTTP, not on building JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web

MODEL = "bench-model"
PROMPT_TOKENS = 100


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def build_events(chunks: int) -> tuple[list[bytes], bytes, bytes]:
    """(content events, the usage-only event, the non-streaming JSON body)."""
    created = int(time.time())
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created}
    events = []
    for i in range(chunks):
        delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
        finish = "stop" if i == chunks - 1 else None
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        events.append(_event({**base, "model": MODEL, "choices": [choice]}))
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": chunks,
        "total_tokens": PROMPT_TOKENS + chunks,
    }
    usage_event = _event({**base, "model": MODEL, "choices": [], "usage": usage})
    text = "".join(f"tok{i} " for i in range(chunks))
    whole = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": created,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    return events, usage_event, json.dumps(whole).encode()


METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="bench-model"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="bench-model"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="bench-model"} 0.1
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="bench-model"} 0.0
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="bench-model"} 1000.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="bench-model"} 900.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100000"} 1.0
"""


def build_app(chunks: int) -> web.Application:
    events, usage_event, whole = build_events(chunks)
    done = b"data: [DONE]\n\n"
    sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body and b'"stream": true' not in body:
            return web.Response(body=whole, content_type="application/json")
        usage = b'"include_usage":true' in body or b'"include_usage": true' in body
        resp = web.StreamResponse(headers=sse_headers)
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
        if usage:
            await resp.write(usage_event)
        await resp.write(done)
        await resp.write_eof()
        return resp

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS, content_type="text/plain")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="fast fake OpenAI engine for bench/proxy_overhead.py")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=16, help="content events per stream")
    args = ap.parse_args()
    web.run_app(
        build_app(args.chunks),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=2048,
    )


if __name__ == "__main__":
    main()
