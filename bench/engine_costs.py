"""What one engine step costs on the real vLLM server (CPU build, the tiny model made here).

    .venv-vllm/bin/python bench/engine_costs.py [--url http://127.0.0.1:8000] [--out FILE]

Measures, with requests sent one at a time (prefill) or as a batch of concurrent
streams (decode), what vLLM's own histograms say (``/metrics``, differences
before and after):

* prefill time (``vllm:request_prefill_time_seconds``) of prompts of 256 to 24k
  tokens with nothing cached, and of 256-2,048 new tokens after a cached context of
  2k-24k tokens;
* decode step time with 1 to 16 concurrent streams over contexts of 1k to 4k
  tokens (the batch's time over its 512 output tokens, measured at the client);
* what a request costs outside the engine: the client's latency less vLLM's
  prefill and decode time (HTTP, chat template, tokenizing the prompt,
  detokenizing and streaming the output).

Then fits the step-time model of :class:`concur.sim.steptime.MeasuredStepTime`

    step = base + per_token x scheduled + per_seq x sequences
         + per_pair x prefill attention pairs + per_kv x decode context tokens

by least squares (a prefill of P tokens after C cached ones is ceil(P / 2048)
chunked steps of the server's token budget), prints each measurement beside the
fit, and the coefficients for a preset (``concur/sim/engine_config.py``). Without
``--url`` it starts its own server (32,768-token cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _proc import loadavg, machine, pin_away_from_the_model

from concur.sim.realvllm import VllmServer, VllmServerConfig, make_model
from concur.sim.server.tokenizer import filler_text
from concur.sim.steptime import MeasuredStepTime

BUDGET = 2048
"""The server's ``--max-num-batched-tokens`` (VllmServerConfig's default)."""
MODEL = "concur-tiny"
ENGINE_TERMS = ("base_s", "per_token_s", "per_seq_s", "per_pair_s", "per_kv_s")
"""The engine's coefficients, in the order of :func:`design`'s columns."""
HISTOGRAMS = (
    "vllm:request_prefill_time_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_decode_time_seconds",
)


def histograms(http: httpx.Client, url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram of :data:`HISTOGRAMS`."""
    out: dict[str, list[float]] = {h: [0.0, 0.0] for h in HISTOGRAMS}
    for line in http.get(url + "/metrics").text.splitlines():
        for h in HISTOGRAMS:
            for i, suffix in enumerate(("_sum{", "_count{")):
                if line.startswith(h + suffix):
                    out[h][i] += float(line.rsplit(" ", 1)[1])
    return {h: (v[0], v[1]) for h, v in out.items()}


def chat(
    http: httpx.Client, url: str, words: str, out: int = 1, *, stream: bool = False
) -> tuple[float, dict[str, Any]]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": out,
        "min_tokens": out,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    t = time.perf_counter()
    resp = http.post(url + "/v1/chat/completions", json=body)
    resp.raise_for_status()
    return time.perf_counter() - t, resp.json()["usage"]


def reset(http: httpx.Client, url: str) -> None:
    http.post(url + "/reset_prefix_cache").raise_for_status()


@dataclass
class Prefill:
    prompt: int
    cached: int
    seconds: float
    client_seconds: float


def prefill_series(http: httpx.Client, url: str, repeats: int) -> list[Prefill]:
    cases = [(p, 0) for p in (256, 512, 1024, 2048, 4096, 8192, 12288, 16384, 24576)]
    cases += [(c + n, c) for c in (2048, 8192, 16384, 24576) for n in (256, 1024, 2048)]
    out = []
    for k, (total, context) in enumerate(cases):
        times, client = [], []
        prompt = cached = 0
        for r in range(repeats):
            reset(http, url)
            seed = f"costs-{k}-{r}"
            text = filler_text(total, seed)
            if context:
                chat(http, url, " ".join(text.split(" ")[:context]))
            before = histograms(http, url)
            latency, usage = chat(http, url, text)
            after = histograms(http, url)
            h = "vllm:request_prefill_time_seconds"
            times.append(after[h][0] - before[h][0])
            client.append(latency)
            prompt = usage["prompt_tokens"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        out.append(Prefill(prompt, cached, statistics.median(times), statistics.median(client)))
        print(
            f"  prefill {prompt:6d} tokens, {cached:6d} cached: {1000 * out[-1].seconds:8.1f} ms"
            f" in vLLM, {1000 * out[-1].client_seconds:8.1f} ms at the client",
            flush=True,
        )
    return out


@dataclass
class Decode:
    streams: int
    context: int
    step_seconds: float
    """vLLM's mean inter-token latency: the engine's step."""
    client_step_seconds: float
    """The batch's time at the client over its output tokens: the serving stack's pace."""


async def _stream(client: httpx.AsyncClient, url: str, words: str, out: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": out,
        "min_tokens": out,
        "ignore_eos": True,
        "stream": True,
    }
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        async for _ in resp.aiter_bytes():
            pass


def decode_series(
    http: httpx.Client, url: str, repeats: int, out_tokens: int = 512
) -> list[Decode]:
    """Steps of ``streams`` requests decoding together: their prompts are cached first,
    then they start at once and decode ``out_tokens`` each. The engine's step is vLLM's
    mean inter-token latency; the client's is the batch's time over ``out_tokens`` (with
    many streams, the serving stack around the engine sets the pace)."""
    result = []
    for context in (1024, 2048, 4096):
        for streams in (1, 2, 4, 8, 16):
            if streams * (context + out_tokens) > 28_000:
                continue
            engine, client = [], []
            for r in range(repeats):
                reset(http, url)
                texts = [
                    filler_text(context, f"decode-{context}-{streams}-{i}-{r}")
                    for i in range(streams)
                ]
                for text in texts:  # prefilled now: the timed run decodes (its prompts hit)
                    chat(http, url, text)
                before = histograms(http, url)

                async def run(texts: list[str] = texts) -> float:
                    async with httpx.AsyncClient(trust_env=False, timeout=600.0) as client:
                        t = time.perf_counter()
                        await asyncio.gather(*(_stream(client, url, x, out_tokens) for x in texts))
                        return time.perf_counter() - t

                client.append(asyncio.run(run()) / out_tokens)
                after = histograms(http, url)
                h = "vllm:inter_token_latency_seconds"
                engine.append((after[h][0] - before[h][0]) / max(1.0, after[h][1] - before[h][1]))
            d = Decode(streams, context, statistics.median(engine), statistics.median(client))
            result.append(d)
            print(
                f"  decode {streams:3d} streams over {context:5d}-token contexts: "
                f"{1000 * d.step_seconds:6.2f} ms per step in vLLM, "
                f"{1000 * d.client_step_seconds:6.2f} ms at the client",
                flush=True,
            )
    return result


def chunks(prompt: int, cached: int) -> list[tuple[int, int]]:
    """(new tokens, tokens before them) of each chunked-prefill step."""
    out, done = [], cached
    while done < prompt:
        n = min(BUDGET, prompt - done)
        out.append((n, done))
        done += n
    return out


def pairs(new: int, before: int) -> float:
    """Attention pairs (query token, key token) of a prefill chunk of ``new`` tokens
    after ``before`` ones."""
    return new * before + new * (new + 1) / 2


def design(prefills: list[Prefill], decodes: list[Decode]) -> tuple[np.ndarray, np.ndarray]:
    """Rows: [steps, scheduled tokens, sequences, prefill pairs, decode context]."""
    rows, y = [], []
    for p in prefills:
        steps = chunks(p.prompt, p.cached)
        chunk_pairs = sum(pairs(n, before) for n, before in steps)
        rows.append([len(steps), p.prompt - p.cached, len(steps), chunk_pairs, 0.0])
        y.append(p.seconds)
    for d in decodes:
        ctx = d.streams * (d.context + 256)  # mean context over the decode
        rows.append([1, d.streams, d.streams, 0.0, ctx])
        y.append(d.step_seconds)
    return np.array(rows, dtype=float), np.array(y)


UNBATCHED = 1.3
"""A decode series whose client step is this much over vLLM's own did not batch."""


def batched(decodes: list[Decode]) -> list[Decode]:
    """The decode series whose streams ran together. Now and then vLLM runs the streams
    of a series one after another (seen at 2 to 8 streams): its inter-token latency is
    then a single stream's and the client's step about ``streams`` times it (8 streams
    over 2,048 tokens: 1.39 ms against 11.3 ms). Fitted in, such a series hides the
    decode's cost per context token and inflates the serving stack's per sequence."""
    return [d for d in decodes if d.client_step_seconds <= UNBATCHED * d.step_seconds]


def fit(prefills: list[Prefill], decodes: list[Decode]) -> dict[str, float]:
    decodes = batched(decodes)
    a, y = design(prefills, decodes)
    # Relative errors matter (a 20 ms decode step as much as a 2 s prefill): weight by 1/y.
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    coef = np.maximum(coef, 0.0)
    out = dict(zip(ENGINE_TERMS, (float(c) for c in coef), strict=True))
    # The serving stack's pace per sequence, where it is slower than the engine.
    paces = [d.client_step_seconds / d.streams for d in decodes if d.streams >= 8]
    out["frontend_per_seq_s"] = max(paces, default=0.0)
    return out


def measure(url: str, repeats: int) -> dict[str, Any]:
    """Every series against the server at ``url``, and the fit: what ``--out`` holds."""
    with httpx.Client(trust_env=False, timeout=600.0) as http:
        chat(http, url, filler_text(3000, "warm-up"), 16)
        prefills = prefill_series(http, url, repeats)
        decodes = decode_series(http, url, repeats)
    coef = fit(prefills, decodes)
    kept = batched(decodes)
    for d in decodes:
        if d not in kept:
            print(
                f"  left out of the fit: {d.streams} streams over {d.context}-token contexts "
                "ran one after another (the client's step is theirs added up)",
                flush=True,
            )
    a, y = design(prefills, kept)
    pred = a @ np.array([coef[k] for k in ENGINE_TERMS])
    print("\nfit: " + ", ".join(f"{k}={v:.4g}" for k, v in coef.items()))
    errors = np.abs(pred / y - 1.0)
    print(f"relative error: median {100 * np.median(errors):.1f}%, max {100 * errors.max():.1f}%")
    overhead = [p.client_seconds - p.seconds for p in prefills]
    print(
        "outside the engine (client latency - vLLM prefill), per request: "
        + ", ".join(f"{p.prompt}:{1000 * o:.0f}ms" for p, o in zip(prefills, overhead, strict=True))
    )
    return {
        "machine": machine(),
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "fit": coef,
        "prefill": [p.__dict__ for p in prefills],
        "decode": [d.__dict__ for d in decodes],
    }


def step_time(costs: dict[str, Any]) -> MeasuredStepTime:
    """The simulator's step time from what :func:`measure` wrote."""
    return MeasuredStepTime(**costs["fit"], name=f"measured {costs.get('measured', '')}".strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/engine-costs.json"))
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        server = VllmServer(VllmServerConfig(model=make_model(), kv_blocks=256)).start()
        url = server.url
        assert server.child is not None
        print(f"  {pin_away_from_the_model(server.child.pid)}", flush=True)
    print(f"engine_costs: {machine()}, load {loadavg()}, server {url}", flush=True)
    try:
        costs = measure(url, args.repeats)
    finally:
        if server is not None:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(costs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
