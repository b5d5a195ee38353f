"""Replay a trace of agents through the engine model under one policy.

The runner is the simulator's stand-in for the proxy: it drives the very same
:class:`~concur.admission.AdmissionGate` and :class:`~concur.control.Controller`
(and so the same policy objects) that ``concur serve`` runs, with the virtual
clock of an :class:`~concur.sim.kernel.EventKernel` injected. Agents send
their growing context step by step, wait for the response, pause for their tool
call, and end with their last step, exactly as a client of the proxy would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from concur import _priority
from concur.adapters.signal import EngineSignal
from concur.admission import AdmissionGate, GateEvent, Ticket
from concur.control import Controller, FailureMode, TickRecord
from concur.policies.base import Policy
from concur.sim.blocks import TokenSeq, VirtualSegment, output_segment
from concur.sim.engine import EngineRequest, EngineStats, FinishedRequest, StepResult
from concur.sim.kernel import EventKernel, Priority
from concur.sim.trace import AgentTrace, Trace


class Engine(Protocol):
    """What the runner needs from an engine (the built-in model or vLLM's scheduler).

    An engine may also offer ``step_many`` (see :class:`StepMany`); the runner
    then lets it run steps ahead up to the next event instead of one per event.
    """

    def add_request(self, req: EngineRequest, now: float) -> None: ...
    def has_work(self) -> bool: ...
    def step(self, now: float) -> StepResult: ...
    def signal(self, now: float) -> EngineSignal: ...
    @property
    def stats(self) -> EngineStats: ...


class StepMany(Protocol):
    """An engine's optional ``step_many(now, until, min_duration)``: one step,
    then more while they start before ``until`` (see ``EngineModel.step_many``)."""

    def __call__(self, now: float, until: float, min_duration: float) -> StepResult: ...


_MIN_STEP_S = 1e-6
"""Shortest engine step, so that virtual time always advances."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    control_interval: float = 1.0
    """Seconds between control ticks (the proxy's ``control.interval``)."""
    failure_mode: FailureMode = "hold"
    max_time: float = 24 * 3600.0
    """Stop the run (and report it unfinished) after this much virtual time."""
    sample_interval: float = 1.0
    """Seconds between time-series samples."""
    engine_priority: bool = True
    """Stamp each step with the steps its agent has done, as the proxy does for vLLM
    (``admission.engine_priority``, :mod:`concur._priority`); an engine with the
    ``priority`` scheduling policy serves by it. ``unlimited`` stands for no concur in
    front of the engine and never stamps."""


@dataclass(slots=True)
class Sample:
    t: float
    kv_usage: float | None
    hit_rate: float | None
    window: int | None
    live: int
    paused: int
    queued: int
    pressure: float | None
    working_set: float | None
    running: int | None
    waiting: int | None
    hits_total: float | None = None
    queries_total: float | None = None
    reason: str | None = None
    """The policy's decision at this tick (``open``: an engine-aware law lifted its limit)."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Per-policy figures of one run."""

    policy: str
    agents: int
    finished_agents: int
    makespan_s: float
    output_tokens: int
    prompt_tokens: int
    output_tok_per_s: float
    total_tok_per_s: float
    prefix_hit_rate: float
    preemptions: int
    prefill_tokens: int
    recomputed_tokens: int
    recompute_share: float
    mean_completion_s: float
    p99_completion_s: float
    mean_queue_wait_s: float
    max_window: int | None
    engine_steps: int
    window_changes: int = 0
    """Ticks at which the window changed."""
    max_pauses: int = 0
    """The most times any one agent was paused."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class RunResult:
    summary: Summary
    samples: list[Sample]
    completion_s: dict[str, float]
    describe: dict[str, object]


@dataclass(slots=True)
class _Agent:
    trace: AgentTrace
    step: int = 0
    context: TokenSeq | None = None
    known_tokens: int = 0
    started: float = 0.0
    request_id: str = ""
    ticket: Ticket | None = None
    prompt_tokens: int = 0


@dataclass(slots=True)
class _Totals:
    finished: dict[str, float] = field(default_factory=dict)
    queue_waits: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    max_window: int | None = 0
    window_changes: int = 0
    pauses: dict[str, int] = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[idx]


class Runner:
    """One replay: a trace, an engine, a policy, a virtual clock."""

    def __init__(
        self,
        trace: Trace,
        engine: Engine,
        policy: Policy,
        *,
        options: RunOptions | None = None,
        seed: int = 0,
        block_size: int = 16,
        progress: Callable[[int, int], None] | None = None,
        request_overhead: Callable[[int], float] | None = None,
    ) -> None:
        """``request_overhead(prompt_tokens)``: seconds each request spends on its way to
        the engine (a serving stack's HTTP, chat template and tokenizer), if any."""
        self.trace = trace
        self.engine = engine
        self.policy = policy
        self.options = options or RunOptions()
        self.kernel = EventKernel(rng=random.Random(seed))
        self.block_size = block_size
        self.progress = progress
        self._overhead = request_overhead
        self.gate = AdmissionGate(clock=lambda: self.kernel.now, on_event=self._on_gate_event)
        self.controller = Controller(
            policy, self.gate, failure_mode=self.options.failure_mode, on_tick=self._on_tick
        )
        self._agents = {a.agent_id: _Agent(a) for a in trace.agents}
        self._by_request: dict[str, _Agent] = {}
        self._totals = _Totals()
        self._samples: list[Sample] = []
        self._engine_busy = False
        self._kick_pending = False
        self._next_sample = 0.0
        self._request_seq = 0
        self._signal: EngineSignal | None = None
        self._step_many: StepMany | None = getattr(engine, "step_many", None)
        self._stamp = self.options.engine_priority and policy.name != "unlimited"
        # Steps that start at or before max_time run; nextafter makes "<" say "<=".
        self._horizon = math.nextafter(self.options.max_time, math.inf)

    # ------------------------------------------------------------------ run

    def run(self) -> RunResult:
        for agent in self._agents.values():
            self.kernel.schedule(
                agent.trace.arrival_s, Priority.AGENT_ARRIVAL, self._arrive_cb(agent)
            )
        self.kernel.schedule(0.0, Priority.CONTROL_TICK, self._tick)
        self.kernel.run(until=self.options.max_time)
        return RunResult(
            summary=self._summary(),
            samples=self._samples,
            completion_s=dict(self._totals.finished),
            describe=self.policy.describe(),
        )

    # --------------------------------------------------------------- agents

    def _arrive_cb(self, agent: _Agent) -> Callable[[], None]:
        def arrive() -> None:
            agent.started = self.kernel.now
            self._submit(agent)

        return arrive

    def _prompt(self, agent: _Agent) -> TokenSeq:
        tr = agent.trace
        step = tr.steps[agent.step]
        if agent.context is None:
            segs: list[VirtualSegment] = []
            new = step.input_tokens
            if tr.shared_prefix is not None:
                segs.append(
                    VirtualSegment(f"shared:{tr.shared_prefix.id}", tr.shared_prefix.tokens)
                )
                new -= tr.shared_prefix.tokens
            if new > 0:
                segs.append(VirtualSegment(f"{tr.agent_id}:in0", new))
            return TokenSeq(segs, self.block_size)
        return agent.context.extended(
            VirtualSegment(f"{tr.agent_id}:in{agent.step}", step.input_tokens)
        )

    def _submit(self, agent: _Agent) -> None:
        prompt = self._prompt(agent)
        last = agent.step == len(agent.trace.steps) - 1

        # The gate resolves the ticket through this callback, at once or later.
        def granted(ticket: Ticket) -> None:
            if ticket.granted:
                self._send(agent, prompt, ticket)

        ticket = self.gate.submit(
            agent.trace.agent_id, context_tokens=len(prompt), done=last, on_resolve=granted
        )
        agent.ticket = ticket

    def _send(self, agent: _Agent, prompt: TokenSeq, ticket: Ticket) -> None:
        step = agent.trace.steps[agent.step]
        self._request_seq += 1
        rid = f"{agent.trace.agent_id}#{agent.step}"
        agent.request_id = rid
        agent.ticket = ticket
        agent.context = prompt
        agent.prompt_tokens = len(prompt)
        self._by_request[rid] = agent
        req = EngineRequest(
            request_id=rid,
            prompt=prompt,
            max_tokens=step.output_tokens,
            known_prefix_tokens=agent.known_tokens,
            priority=_priority.of(ticket.agent) if self._stamp and ticket.agent is not None else 0,
        )
        delay = 0.0 if self._overhead is None else self._overhead(len(prompt))
        if delay > 0.0:
            self.kernel.schedule_in(delay, Priority.TOOL_DONE, lambda: self._add(req))
        else:
            self._add(req)

    def _add(self, req: EngineRequest) -> None:
        self.engine.add_request(req, self.kernel.now)
        self._kick()

    def _finished(self, fin: FinishedRequest) -> None:
        agent = self._by_request.pop(fin.request_id)
        tr = agent.trace
        assert agent.context is not None and agent.ticket is not None
        agent.context = agent.context.extended(output_segment(fin.request_id, fin.output_tokens))
        agent.known_tokens = fin.kv_tokens
        self._totals.prompt_tokens += fin.prompt_tokens
        self._totals.output_tokens += fin.output_tokens
        ticket = agent.ticket
        ticket.usage_tokens = len(agent.context)
        self.gate.finish(ticket)
        now = self.kernel.now
        if agent.step == len(tr.steps) - 1:
            self._totals.finished[tr.agent_id] = now - agent.started
            if self.progress is not None:
                self.progress(len(self._totals.finished), len(self._agents))
            if len(self._totals.finished) == len(self._agents):
                self.kernel.stop()
            return
        latency = tr.steps[agent.step].tool_latency_s
        agent.step += 1
        self.kernel.schedule_in(latency, Priority.TOOL_DONE, lambda: self._submit(agent))

    # --------------------------------------------------------------- engine

    def _kick(self) -> None:
        if self._engine_busy or self._kick_pending:
            return
        self._kick_pending = True
        self.kernel.schedule(self.kernel.now, Priority.ENGINE_STEP_START, self._start_step)

    def _start_step(self) -> None:
        self._kick_pending = False
        if self._engine_busy or not self.engine.has_work():
            return
        kernel = self.kernel
        now = kernel.now
        if self._step_many is not None:
            # Steps may be applied ahead of time only up to the next event (and
            # never past the end of the run): whatever happens then sees the
            # engine as stepping one by one would have left it.
            nxt = kernel.peek()
            until = self._horizon if nxt is None or nxt > self._horizon else nxt
            result = self._step_many(now, until, _MIN_STEP_S)
            end = result.end
        else:
            result = self.engine.step(now)
            end = now + max(result.duration, _MIN_STEP_S)
        self._engine_busy = True
        kernel.schedule(end, Priority.ENGINE_STEP_DONE, lambda: self._step_done(result))

    def _step_done(self, result: StepResult) -> None:
        self._engine_busy = False
        for fin in result.finished:
            self._finished(fin)
        if self.engine.has_work():
            self._kick()

    # -------------------------------------------------------------- control

    def _tick(self) -> None:
        now = self.kernel.now
        self._signal = self.engine.signal(now)
        self.controller.tick(now, self._signal)
        if len(self._totals.finished) < len(self._agents):
            self.kernel.schedule_in(
                self.options.control_interval, Priority.CONTROL_TICK, self._tick
            )

    def _on_tick(self, rec: TickRecord) -> None:
        window = rec.decision.window
        if window != rec.window_before:
            self._totals.window_changes += 1
        if window is None or self._totals.max_window is None:
            self._totals.max_window = None
        else:
            self._totals.max_window = max(self._totals.max_window, window)
        if rec.now + 1e-9 < self._next_sample:
            return
        self._next_sample = rec.now + self.options.sample_interval
        o = rec.observation
        self._samples.append(
            Sample(
                t=rec.now,
                kv_usage=o.kv_usage,
                hit_rate=o.hit_rate,
                window=window,
                live=self.gate.live,
                paused=self.gate.paused,
                queued=self.gate.queued,
                pressure=rec.decision.pressure,
                working_set=rec.decision.parts.get("working_set"),
                running=o.engine_running,
                waiting=o.engine_waiting,
                hits_total=self._signal.prefix_hits_total if self._signal else None,
                queries_total=self._signal.prefix_queries_total if self._signal else None,
                reason=rec.decision.reason,
            )
        )

    def _on_gate_event(self, event: GateEvent) -> None:
        if event.kind == "admitted" and event.waited is not None:
            self._totals.queue_waits.append(event.waited)
        elif event.kind == "paused":
            pauses = self._totals.pauses
            pauses[event.agent_id] = pauses.get(event.agent_id, 0) + 1

    # -------------------------------------------------------------- summary

    def _summary(self) -> Summary:
        t = self._totals
        stats = self.engine_stats()
        makespan = max((self._agents[a].started + d for a, d in t.finished.items()), default=0.0)
        completions = list(t.finished.values())
        prefill = int(stats.get("prefill_tokens", 0))
        recomputed = int(stats.get("recomputed_tokens", 0))
        hits = float(stats.get("prefix_hits", 0))
        queries = float(stats.get("prefix_queries", 0))
        span = makespan if makespan > 0 else 1.0
        return Summary(
            policy=_policy_label(self.policy),
            agents=len(self._agents),
            finished_agents=len(t.finished),
            makespan_s=round(makespan, 3),
            output_tokens=t.output_tokens,
            prompt_tokens=t.prompt_tokens,
            output_tok_per_s=round(t.output_tokens / span, 2),
            total_tok_per_s=round((t.output_tokens + t.prompt_tokens) / span, 2),
            prefix_hit_rate=round(hits / queries, 4) if queries else 0.0,
            preemptions=int(stats.get("preemptions", 0)),
            prefill_tokens=prefill,
            recomputed_tokens=recomputed,
            recompute_share=round(recomputed / prefill, 4) if prefill else 0.0,
            mean_completion_s=round(sum(completions) / len(completions), 3) if completions else 0,
            p99_completion_s=round(_percentile(completions, 0.99), 3),
            mean_queue_wait_s=(
                round(sum(t.queue_waits) / len(t.queue_waits), 3) if t.queue_waits else 0.0
            ),
            max_window=t.max_window,
            engine_steps=int(stats.get("steps", 0)),
            window_changes=t.window_changes,
            max_pauses=max(t.pauses.values(), default=0),
        )

    def engine_stats(self) -> dict[str, float]:
        """The engine's cumulative counters (``EngineStats`` fields) as a dict."""
        return {k: float(v) for k, v in asdict(self.engine.stats).items()}


def _policy_label(policy: Policy) -> str:
    d = policy.describe()
    name = str(d.get("name"))
    if name == "static":
        return f"static:{d.get('window')}"
    preset = d.get("preset")
    if name == "aimd" and preset not in (None, "default"):
        return f"aimd:{preset}"
    return name
