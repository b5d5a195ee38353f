"""Replay a trace as real concurrent agents over HTTP against an OpenAI base URL.

Each agent of the trace becomes one asyncio task that, on its own schedule:

1. waits until ``arrival_s / speed`` wall seconds after the swarm starts;
2. for each step, appends a user message of ``input_tokens`` tokens of filler
   text (:func:`concur.sim.server.tokenizer.filler_text`: 3-letter words, one
   token each for ``concur engine`` and about one each for BPE tokenizers; step 0
   starts with a system message holding
   the shared prefix, identical for every agent with the same prefix id), sends
   the *whole* conversation so far to ``/v1/chat/completions`` with
   ``max_tokens = min_tokens = output_tokens`` and ``ignore_eos`` (so a real vLLM
   decodes exactly that many tokens), streams the answer (timing the first
   token) and appends the assistant's reply verbatim, so the context grows and is
   re-sent exactly as a real agent's is;
3. sleeps its tool latency ``/ speed`` and goes on; its last request carries the
   done header, which frees its slot in concur at once.

Stopped early (``stop``, set by ``concur swarm`` on Ctrl-C), the swarm cancels its
agents and ends each one that had started on the server (``DELETE
/concur/agents/{id}`` as the agent itself), so concur frees their slots at once
rather than when they look idle; the result then counts them as interrupted.

Every request carries the agent's id in ``X-Concur-Agent-Id``. A failed request
is retried with exponential backoff (honouring ``Retry-After``) up to
``max_retries`` times (concur's ``queue_timeout`` 429, an agent that waited
``admission.max_queue_wait`` for a slot, is sent again after its ``Retry-After``
without using up the retries: a batch swarm waits for slots by design); an agent
that still fails gives up and is reported, and the swarm carries on. Errors are
counted by kind, never raised.

Times in results are *simulated* seconds (wall seconds x ``speed``) unless the
field name says ``wall``, so a swarm against ``concur engine --speed 20`` reports
the same figures as ``concur sim`` on the same trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from concur.sim.server.tokenizer import count_tokens, filler_text
from concur.sim.trace import AgentTrace, Trace

__all__ = [
    "AGENT_HEADER",
    "DONE_HEADER",
    "AgentResult",
    "ProgressFn",
    "RequestFailed",
    "StepResult",
    "SwarmOptions",
    "SwarmResult",
    "SwarmSummary",
    "agent_messages",
    "discover_model",
    "make_client",
    "normalize_base_url",
    "run_swarm",
]

AGENT_HEADER = "X-Concur-Agent-Id"
DONE_HEADER = "X-Concur-Agent-Done"

ProgressFn = Callable[[int, int], None]


def normalize_base_url(url: str) -> str:
    """An OpenAI base URL ending in ``/v1`` (``http://h:8000`` -> ``http://h:8000/v1``)."""
    text = url.strip().rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise ValueError(
            f"--base-url must be an http:// or https:// URL such as http://127.0.0.1:9000/v1, "
            f"got {url!r}"
        )
    return text if text.endswith("/v1") else text + "/v1"


@dataclass(frozen=True, slots=True)
class SwarmOptions:
    """How to replay: where, how fast, and how to treat failures."""

    base_url: str
    """OpenAI base URL (``/v1`` is appended when missing)."""
    speed: float = 1.0
    """Time scale: arrivals and tool pauses are divided by it (match ``concur engine``)."""
    model: str | None = None
    """Model name sent in requests; ``None`` asks ``GET /v1/models`` for the first one."""
    concurrency_limit: int | None = None
    """At most this many agents run at once on the client side (``None``: no limit)."""
    stream: bool = True
    """Stream responses (and time the first token); ``False`` sends plain requests."""
    max_retries: int = 3
    """Retries of one failed request before its agent gives up."""
    backoff_s: float = 0.5
    """Wall seconds before the first retry; doubles at each retry."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    """Longest wait, in wall seconds, for response headers or between two chunks
    (a queued agent's request is held open by concur until it is admitted)."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; for engines started with an API key."""
    agent_header: str = AGENT_HEADER
    done_header: str = DONE_HEADER
    agent_field: str | None = None
    """Also name the agent in each request body under this key (ThunderAgent reads
    ``program_id``); ``None``: headers only."""
    release_path: str | None = None
    """When an agent ends, ``POST {agent_field: id}`` to this path of the server (outside
    ``/v1``; ThunderAgent frees a program on ``/programs/release``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"--speed must be a number > 0, got {self.speed!r}")
        if self.concurrency_limit is not None and self.concurrency_limit < 1:
            raise ValueError(
                f"--concurrency-limit must be >= 1 (or unset for no limit), "
                f"got {self.concurrency_limit}"
            )
        if self.max_retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("backoff must be >= 0 and timeouts > 0 seconds")
        if self.release_path is not None and self.agent_field is None:
            raise ValueError("release_path needs agent_field: the field that names the agent")

    @property
    def server_url(self) -> str:
        """The server's root URL: the base URL without its ``/v1``."""
        return self.base_url.removesuffix("/v1")


class RequestFailed(Exception):
    """One request failed; ``kind`` is its error class (``http_429``, ``connect``, ...)."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        waiting: bool = False,
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.waiting = waiting
        """concur's queue wait ran out: send again, not counted against the retries."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """One answered request, as the client saw it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    """``usage.prompt_tokens_details.cached_tokens``; ``None`` when the server omits it."""
    ttft_wall_s: float | None
    latency_wall_s: float


@dataclass(slots=True)
class AgentResult:
    """One agent's outcome. ``*_s`` fields are simulated seconds."""

    agent_id: str
    arrival_s: float
    steps: int
    steps_done: int = 0
    finished: bool = False
    completion_s: float | None = None
    """From arrival to the end of the last step (simulated seconds)."""
    end_s: float | None = None
    """When the agent ended, from the swarm's start (simulated seconds)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    """Why the agent gave up (``None`` when it finished)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "arrival_s": self.arrival_s,
            "steps": self.steps,
            "steps_done": self.steps_done,
            "finished": self.finished,
            "completion_s": _round(self.completion_s),
            "end_s": _round(self.end_s),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "mean_ttft_s": _round(_mean(self.ttft_s)),
            "retries": self.retries,
            "errors": dict(self.errors),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class SwarmSummary:
    """Headline figures of one swarm run. ``*_s`` are simulated seconds."""

    base_url: str
    model: str
    speed: float
    agents: int
    finished_agents: int
    failed_agents: int
    requests: int
    makespan_s: float
    makespan_wall_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    client_hit_rate: float | None
    """cached / prompt tokens from the responses' usage (``None`` if never reported)."""
    output_tok_per_s: float
    total_tok_per_s: float
    mean_completion_s: float
    p50_completion_s: float
    p99_completion_s: float
    mean_ttft_s: float | None
    p99_ttft_s: float | None
    retries: int
    errors: dict[str, int]
    interrupted: int = 0
    """Agents stopped before they finished because the swarm was stopped (Ctrl-C)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class SwarmResult:
    summary: SwarmSummary
    agents: list[AgentResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary.to_dict(),
            "agents": [a.to_dict() for a in self.agents],
        }


# ------------------------------------------------------------------ prompts


def agent_messages(agent: AgentTrace, step: int) -> list[dict[str, str]]:
    """The messages a step *adds* to the conversation (before the assistant's reply).

    Step 0 opens with the shared prefix as a system message (when the agent has
    one) and the rest of its input as a user message; later steps add one user
    message (the tool's output) of ``input_tokens`` words.
    """
    new = agent.steps[step].input_tokens
    out: list[dict[str, str]] = []
    if step == 0 and agent.shared_prefix is not None:
        prefix = agent.shared_prefix
        out.append({"role": "system", "content": filler_text(prefix.tokens, f"prefix:{prefix.id}")})
        new -= prefix.tokens
    # A chat request needs a user turn; a step whose input is all prefix sends one word.
    out.append({"role": "user", "content": filler_text(max(1, new), f"{agent.agent_id}:in{step}")})
    return out


# --------------------------------------------------------------- the swarm


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if msg:
            return str(msg)
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", "replace")


def _error_code(body: bytes) -> str | None:
    try:
        data = json.loads(body)
        code = data.get("error", {}).get("code") if isinstance(data, dict) else None
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def _http_error(resp: httpx.Response, body: bytes) -> RequestFailed:
    code = resp.status_code
    if code == 429 and _error_code(body) == "queue_timeout":
        # concur held the agent for admission.max_queue_wait: it waits again (a batch
        # swarm waits for slots by design), without using up its retries.
        return RequestFailed(
            "queue_timeout",
            f"HTTP 429: {_error_message(body)}",
            retryable=True,
            retry_after=_retry_after(resp),
            waiting=True,
        )
    kind = "http_429" if code == 429 else f"http_{code // 100}xx"
    retryable = code in (408, 409, 425, 429) or code >= 500
    return RequestFailed(
        kind,
        f"HTTP {code}: {_error_message(body)}",
        retryable=retryable,
        retry_after=_retry_after(resp),
    )


def _usage_fields(usage: Any) -> tuple[int | None, int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None, None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return usage.get("prompt_tokens"), usage.get("completion_tokens"), cached


class _Swarm:
    """One run: the shared client, the clock, and the agents' results."""

    def __init__(
        self,
        trace: Trace,
        options: SwarmOptions,
        client: httpx.AsyncClient,
        model: str,
        progress: ProgressFn | None,
    ) -> None:
        self.trace = trace
        self.opt = options
        self.client = client
        self.model = model
        self.progress = progress
        self.results = {
            a.agent_id: AgentResult(a.agent_id, a.arrival_s, len(a.steps)) for a in trace.agents
        }
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.ended = 0
        self.t0 = 0.0
        self.started: set[str] = set()
        """Agents that sent a request (the server may hold a slot for them)."""
        self.interrupted = 0
        limit = options.concurrency_limit
        self.slots = asyncio.Semaphore(limit) if limit is not None else None

    def now_wall(self) -> float:
        return time.monotonic() - self.t0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run every agent to its end, or until ``stop`` is set: then cancel the agents
        still running and end on the server those that had started."""
        self.t0 = time.monotonic()
        tasks = [
            asyncio.create_task(self._agent(agent), name=f"agent {agent.agent_id}")
            for agent in self.trace.agents
        ]
        stopped = asyncio.create_task(stop.wait()) if stop is not None else None
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while pending:
                waits = pending if stopped is None else {*pending, stopped}
                _, pending_now = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                pending = {t for t in pending_now if t is not stopped}
                if stopped is not None and stopped.done():
                    break
        finally:
            if stopped is not None:
                stopped.cancel()
            running = [t for t in tasks if not t.done()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _agent(self, agent: AgentTrace) -> None:
        res = self.results[agent.agent_id]
        try:
            await asyncio.sleep(max(0.0, agent.arrival_s / self.opt.speed - self.now_wall()))
            if self.slots is None:
                await self._steps(agent, res)
            else:
                async with self.slots:
                    await self._steps(agent, res)
        except RequestFailed as exc:
            res.error = str(exc)
        except asyncio.CancelledError:
            res.error = "interrupted"
            self.interrupted += 1
            if agent.agent_id in self.started:
                await self._end(agent.agent_id)
            raise
        except Exception as exc:  # an agent must never take the swarm down
            res.error = f"client_bug: {type(exc).__name__}: {exc}"
            self.errors["client_bug"] += 1
            res.errors["client_bug"] = res.errors.get("client_bug", 0) + 1
        finally:
            res.end_s = self.now_wall() * self.opt.speed
            await self._release(agent.agent_id)
            if res.finished:
                res.completion_s = res.end_s - agent.arrival_s
            self.ended += 1
            if self.progress is not None:
                self.progress(self.ended, len(self.results))

    async def _end(self, agent_id: str) -> None:
        """End a stopped agent on the server now: ``DELETE /concur/agents/{id}`` sent as
        the agent itself (concur frees its slot; any other server just says 404)."""
        opt = self.opt
        with contextlib.suppress(httpx.HTTPError):
            await self.client.delete(
                f"{opt.server_url}/concur/agents/{quote(agent_id, safe='')}",
                headers={opt.agent_header: agent_id},
                timeout=2.0,
            )

    async def _release(self, agent_id: str) -> None:
        """Tell a server that tracks agents by a body field that this one is over."""
        opt = self.opt
        if opt.release_path is None or opt.agent_field is None:
            return
        try:
            await self.client.post(
                opt.server_url + opt.release_path, json={opt.agent_field: agent_id}
            )
        except httpx.HTTPError:
            self.errors["release"] += 1

    async def _steps(self, agent: AgentTrace, res: AgentResult) -> None:
        messages: list[dict[str, str]] = []
        last = len(agent.steps) - 1
        for k, step in enumerate(agent.steps):
            messages.extend(agent_messages(agent, k))
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "max_tokens": step.output_tokens,
                "min_tokens": step.output_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            }
            if self.opt.agent_field is not None:
                body[self.opt.agent_field] = agent.agent_id
            if self.opt.stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
            headers = {self.opt.agent_header: agent.agent_id}
            if k == last:
                headers[self.opt.done_header] = "1"
            self.started.add(agent.agent_id)
            out = await self._with_retries(body, headers, res)
            res.steps_done += 1
            res.prompt_tokens += out.prompt_tokens
            res.completion_tokens += out.completion_tokens
            res.cached_tokens += out.cached_tokens or 0
            if out.ttft_wall_s is not None:
                res.ttft_s.append(out.ttft_wall_s * self.opt.speed)
            messages.append({"role": "assistant", "content": out.text})
            if k < last and step.tool_latency_s > 0:
                await asyncio.sleep(step.tool_latency_s / self.opt.speed)
        res.finished = True

    async def _with_retries(
        self, body: dict[str, Any], headers: dict[str, str], res: AgentResult
    ) -> StepResult:
        attempt = 0
        while True:
            self.requests += 1
            try:
                return await self._request(body, headers)
            except RequestFailed as exc:
                self.errors[exc.kind] += 1
                res.errors[exc.kind] = res.errors.get(exc.kind, 0) + 1
                if exc.waiting:
                    res.retries += 1
                    await asyncio.sleep(exc.retry_after or self.opt.backoff_s)
                    continue
                if not exc.retryable or attempt >= self.opt.max_retries:
                    raise
                delay = self.opt.backoff_s * (2**attempt)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                attempt += 1
                res.retries += 1
                await asyncio.sleep(delay)

    async def _request(self, body: dict[str, Any], headers: dict[str, str]) -> StepResult:
        url = f"{self.opt.base_url}/chat/completions"
        sent = time.monotonic()
        try:
            if not self.opt.stream:
                resp = await self.client.post(url, json=body, headers=headers)
                if resp.status_code != 200:
                    raise _http_error(resp, resp.content)
                return self._plain(resp, body, sent)
            async with self.client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise _http_error(resp, await resp.aread())
                return await self._streamed(resp, body, sent)
        except httpx.ConnectError as exc:
            raise RequestFailed(
                "connect", str(exc) or "connection refused", retryable=True
            ) from exc
        except httpx.TimeoutException as exc:
            raise RequestFailed("timeout", type(exc).__name__, retryable=True) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise RequestFailed("stream", f"{type(exc).__name__}: {exc}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise RequestFailed("http", f"{type(exc).__name__}: {exc}", retryable=True) from exc

    def _plain(self, resp: httpx.Response, body: dict[str, Any], sent: float) -> StepResult:
        try:
            data = resp.json()
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestFailed(
                "bad_response", f"not an OpenAI chat completion: {exc}", retryable=True
            ) from exc
        return self._result(text, data.get("usage"), body, None, time.monotonic() - sent)

    async def _streamed(
        self, resp: httpx.Response, body: dict[str, Any], sent: float
    ) -> StepResult:
        parts: list[str] = []
        usage: Any = None
        first: float | None = None
        done = False
        # Read to the very end (never break early): a body left unread makes httpx close
        # the connection instead of returning it to the pool.
        async for line in resp.aiter_lines():
            if done or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise RequestFailed("bad_response", f"bad SSE JSON: {exc}", retryable=True) from exc
            if isinstance(chunk.get("error"), dict):
                msg = chunk["error"].get("message", "error event in the stream")
                raise RequestFailed("stream_error", str(msg), retryable=True)
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.monotonic() - sent
                    parts.append(content)
            if chunk.get("usage"):
                usage = chunk["usage"]
        if not done:
            raise RequestFailed("stream", "the stream ended before data: [DONE]", retryable=True)
        return self._result("".join(parts), usage, body, first, time.monotonic() - sent)

    def _result(
        self,
        text: str,
        usage: Any,
        body: dict[str, Any],
        ttft: float | None,
        latency: float,
    ) -> StepResult:
        prompt, completion, cached = _usage_fields(usage)
        if prompt is None:
            prompt = sum(count_tokens(m["content"]) for m in body["messages"])
        if completion is None:
            completion = count_tokens(text)
        return StepResult(text, int(prompt), int(completion), cached, ttft, latency)

    def summary(self) -> SwarmSummary:
        speed = self.opt.speed
        agents = list(self.results.values())
        done = [a for a in agents if a.finished]
        ends = [a.end_s for a in done if a.end_s is not None]
        makespan = max(ends, default=0.0)
        span = makespan or 1.0
        prompt = sum(a.prompt_tokens for a in agents)
        completion = sum(a.completion_tokens for a in agents)
        cached = sum(a.cached_tokens for a in agents)
        reported_cache = any(a.cached_tokens for a in agents)
        completions = [a.completion_s for a in done if a.completion_s is not None]
        ttfts = [t for a in agents for t in a.ttft_s]
        return SwarmSummary(
            base_url=self.opt.base_url,
            model=self.model,
            speed=speed,
            agents=len(agents),
            finished_agents=len(done),
            failed_agents=len(agents) - len(done),
            requests=self.requests,
            makespan_s=round(makespan, 3),
            makespan_wall_s=round(makespan / speed, 3),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            client_hit_rate=round(cached / prompt, 4) if prompt and reported_cache else None,
            output_tok_per_s=round(completion / span, 2),
            total_tok_per_s=round((prompt + completion) / span, 2),
            mean_completion_s=round(sum(completions) / len(completions), 3) if completions else 0.0,
            p50_completion_s=round(_percentile(completions, 0.5), 3),
            p99_completion_s=round(_percentile(completions, 0.99), 3),
            mean_ttft_s=_round(_mean(ttfts)),
            p99_ttft_s=_round(_percentile(ttfts, 0.99)) if ttfts else None,
            retries=sum(a.retries for a in agents),
            errors=dict(sorted(self.errors.items())),
            interrupted=self.interrupted,
        )


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id ``GET {base_url}/models`` lists."""
    url = f"{base_url}/models"
    try:
        resp = await client.get(url)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(
            f"cannot read the model name from {url} ({type(exc).__name__}: {exc}); "
            "is the server up? Pass --model NAME to skip this"
        ) from None


def make_client(options: SwarmOptions, agents: int) -> httpx.AsyncClient:
    """The one HTTP client the whole swarm shares, sized to the agent count."""
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    size = max(1, min(agents, options.concurrency_limit or agents)) + 4
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        timeout=httpx.Timeout(options.read_timeout_s, connect=options.connect_timeout_s, pool=None),
        headers=headers,
        trust_env=False,
    )


async def run_swarm(
    trace: Trace,
    options: SwarmOptions,
    *,
    progress: ProgressFn | None = None,
    client: httpx.AsyncClient | None = None,
    stop: asyncio.Event | None = None,
) -> SwarmResult:
    """Replay ``trace`` against ``options.base_url``; never raises for request failures.

    Raises ValueError only when the model name is not given and cannot be
    discovered. ``progress(done, total)`` is called whenever an agent ends. Setting
    ``stop`` ends the run early: its agents are stopped and ended on the server, and
    the result (so far) is returned.
    """
    own = client is None
    http = client if client is not None else make_client(options, len(trace.agents))
    try:
        model = options.model or await discover_model(http, options.base_url)
        swarm = _Swarm(trace, options, http, model, progress)
        await swarm.run(stop)
        return SwarmResult(swarm.summary(), list(swarm.results.values()))
    finally:
        if own:
            await http.aclose()
