"""The simulated vLLM V1 engine: scheduler + block pool + roofline clock.

Pure and deterministic: no I/O and no clock reads; the caller passes ``now``.
A step's effects (blocks, computed tokens, outputs, finished requests) are
applied when :meth:`EngineModel.step` is called; the step *takes*
``StepResult.duration`` seconds, so a driver delivers its outputs at
``StepResult.end`` and calls ``step`` again then (if :meth:`has_work`).

:meth:`EngineModel.step_many` does the same for a whole run of steps: after
one ordinary step it applies the pure-decode steps that follow (every running
request samples one token; nothing is admitted, prefilled or preempted) at
once, up to a time the driver names (its next event), the first step that
finishes a request, or a step that would preempt. The outcome is exactly that
of stepping one by one (``EngineConfig.fast_forward`` switches it off;
``tests/sim/test_fastforward.py`` checks they agree), at a fraction of the
cost: such runs are most of a long agentic simulation's steps.

Prompt conventions (see :mod:`concur.sim.blocks`):

- a prompt is a :class:`~concur.sim.blocks.TokenSeq` of segments;
- a shared system prompt is ``VirtualSegment(prefix_id, tokens)`` at the start
  of every agent's first prompt;
- the engine names request ``rid``'s output tokens
  ``VirtualSegment(f"{rid}:out", n)`` (:func:`~concur.sim.blocks.output_segment`);
- an agent's next prompt is its previous prompt + ``output_segment(rid, n)`` +
  a new segment for the step's new input (any key unique to it, e.g.
  ``f"{agent}:in{k}"``). Sent that way, every full block of the previous
  context hits the cache if it was not evicted;
- pass the agent's own context object as the prompt: the engine hashes it in
  place (hashes depend on content only) and works on a copy, so the agent's
  next ``extended(...)`` context is hashed only for its new blocks;
- request ids must be unique within a run (they name output tokens);
- ``known_prefix_tokens`` of an agent's next request is the previous
  ``FinishedRequest.kv_tokens``, so recomputed tokens are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from concur.adapters.signal import EngineSignal
from concur.sim.blocks import DEFAULT_BLOCK_SIZE, TokenSeq
from concur.sim.scheduler import (
    DecodePlan,
    EngineRequest,
    FinishedRequest,
    RequestState,
    Scheduler,
    SchedulingPolicy,
)
from concur.sim.steptime import (
    GpuSpec,
    ModelSpec,
    StepTime,
    StepTimeModel,
    build_step_time,
)
from concur.sim.steptime import kv_capacity_tokens as _derive_capacity

__all__ = [
    "EngineConfig",
    "EngineModel",
    "EngineRequest",
    "EngineStats",
    "FinishedRequest",
    "StepResult",
    "engine_config",
]


def _default_step_time() -> StepTimeModel:
    return build_step_time("llama-3-8b", "h100")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Sizing and scheduler knobs of one simulated engine.

    ``num_blocks`` counts vLLM's null block, like ``num_gpu_blocks``: capacity
    in tokens is ``num_blocks x block_size`` (what ``cache_config_info``
    reports), usable blocks ``num_blocks - 1``. Use :meth:`from_capacity` to size
    by tokens, or :func:`engine_config` to size from a model and GPU preset.
    """

    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    step_time: StepTime = field(default_factory=_default_step_time)
    reserve_full_isl: bool = True
    """vLLM's ``scheduler_reserve_full_isl``: admit only if the whole sequence fits."""
    watermark: float = 0.0
    """vLLM's scheduler ``watermark``: fraction of blocks kept free at admission."""
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    scheduling_policy: SchedulingPolicy = "fcfs"
    """vLLM's ``--scheduling-policy``: ``fcfs`` (its default) or ``priority``, which serves
    and preempts by each request's ``priority`` (see :mod:`concur.sim.scheduler`)."""
    fast_forward: bool = True
    """Let :meth:`EngineModel.step_many` apply runs of pure-decode steps at once
    (same results as stepping one by one; off only to check exactly that)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"EngineConfig.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks < 2:
            raise ValueError(
                f"EngineConfig.num_blocks must be >= 2 (one is vLLM's null block), "
                f"got {self.num_blocks}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"EngineConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens must be >= 1, "
                f"got {self.max_num_batched_tokens}"
            )
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"EngineConfig.watermark must be in [0, 1), got {self.watermark}")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @classmethod
    def from_capacity(
        cls, kv_capacity_tokens: int, *, block_size: int = DEFAULT_BLOCK_SIZE, **kwargs: Any
    ) -> EngineConfig:
        """A config holding ``kv_capacity_tokens // block_size`` blocks."""
        if kv_capacity_tokens < 2 * block_size:
            raise ValueError(
                f"kv_capacity_tokens must be >= {2 * block_size} (two blocks), "
                f"got {kv_capacity_tokens}"
            )
        return cls(num_blocks=kv_capacity_tokens // block_size, block_size=block_size, **kwargs)


def engine_config(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    kv_capacity_tokens: int | None = None,
    *,
    gpu_memory_utilization: float = 0.9,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    reserve_full_isl: bool = True,
    watermark: float = 0.0,
    enable_prefix_caching: bool = True,
    overhead_s: float = 0.002,
    max_model_len: int | None = None,
    scheduling_policy: SchedulingPolicy = "fcfs",
    fast_forward: bool = True,
) -> EngineConfig:
    """An engine for ``model`` on ``tp`` x ``gpu``: roofline step time, and KV
    capacity derived from GPU memory unless ``kv_capacity_tokens`` is given."""
    capacity = kv_capacity_tokens
    if capacity is None:
        capacity = _derive_capacity(model, gpu, tp, gpu_memory_utilization=gpu_memory_utilization)
    return EngineConfig.from_capacity(
        capacity,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        step_time=build_step_time(model, gpu, tp, overhead_s=overhead_s),
        reserve_full_isl=reserve_full_isl,
        watermark=watermark,
        enable_prefix_caching=enable_prefix_caching,
        max_model_len=max_model_len,
        scheduling_policy=scheduling_policy,
        fast_forward=fast_forward,
    )


@dataclass(frozen=True, slots=True)
class StepResult:
    """One engine step, or a run of steps from :meth:`EngineModel.step_many`.

    For a run, counts are summed over its steps, ``prefill_tokens``,
    ``num_requests``, ``preempted``, ``admitted`` and ``recomputed_tokens``
    are the first step's (the others are pure decode steps), ``outputs`` holds
    each request's new tokens over the run and ``finished`` the requests the
    last step completed; ``end`` is exact, ``duration`` is ``end - start``.
    """

    start: float
    duration: float
    """Seconds the step takes (roofline); 0 if nothing was scheduled."""
    step_index: int
    scheduled_tokens: int
    prefill_tokens: int
    decode_tokens: int
    num_requests: int
    """Requests in the batch."""
    outputs: dict[str, int]
    """New output tokens per request (1 for each request that sampled a token)."""
    finished: tuple[FinishedRequest, ...]
    preempted: tuple[str, ...]
    """Requests preempted (recompute) while scheduling this step."""
    admitted: tuple[str, ...]
    """Requests moved from waiting to running in this step."""
    recomputed_tokens: int
    context_tokens: int
    """KV tokens read by the step's attention (sum of scheduled contexts)."""
    num_steps: int = 1
    end_time: float | None = None
    """When the run's last step ends (set by :meth:`EngineModel.step_many`)."""

    @property
    def end(self) -> float:
        return self.start + self.duration if self.end_time is None else self.end_time


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Cumulative counters of one engine."""

    steps: int
    busy_time: float
    """Sum of step durations."""
    scheduled_tokens: int
    prefill_tokens: int
    """Prompt tokens computed (recomputation included)."""
    decode_tokens: int
    cached_tokens: int
    """Tokens served from the prefix cache over all admissions (re-admissions too)."""
    recomputed_tokens: int
    output_tokens: int
    preemptions: int
    evicted_blocks: int
    """Cached blocks whose content was dropped when the block was reused."""
    prefix_queries: int
    """vLLM's ``prefix_cache_queries`` (tokens, first admissions)."""
    prefix_hits: int
    """vLLM's ``prefix_cache_hits`` (tokens, first admissions)."""
    requests_added: int
    requests_finished: int
    requests_aborted: int

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class EngineModel:
    """A simulated vLLM V1 engine (one data-parallel rank)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._sched = Scheduler(
            num_blocks=config.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            reserve_full_isl=config.reserve_full_isl,
            watermark=config.watermark,
            enable_prefix_caching=config.enable_prefix_caching,
            max_model_len=config.max_model_len,
            policy=config.scheduling_policy,
        )
        self._duration = config.step_time.duration
        self._steps = 0
        self._busy = 0.0
        self._scheduled = 0
        self._added = 0
        self._finished = 0
        self._aborted = 0

    # -- requests ------------------------------------------------------------

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue a request (in the order of the scheduling policy). Raises ValueError if it
        can never fit."""
        self._sched.add_request(req, now)
        self._added += 1

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; False if it is not in the engine."""
        ok = self._sched.abort(request_id)
        self._aborted += ok
        return ok

    def has_work(self) -> bool:
        return self._sched.has_work()

    def request(self, request_id: str) -> RequestState | None:
        """The live state of a request (read it, do not change it)."""
        return self._sched.requests.get(request_id)

    # -- stepping ------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule and run one step starting at ``now``.

        All of the step's effects are applied at once; it lasts
        ``result.duration`` seconds, so deliver ``outputs``/``finished`` at
        ``result.end`` and step again then while :meth:`has_work`. If nothing
        could be scheduled (only when there is no work) the result has
        ``duration == 0`` and ``scheduled_tokens == 0``."""
        sched = self._sched
        batch = sched.schedule(now)
        duration = self._duration(
            batch.scheduled_tokens,
            batch.context_tokens,
            batch.prefill_pairs,
            batch.prefill_context,
            len(batch.requests),
        )
        index = self._steps
        if batch.scheduled_tokens:
            self._steps += 1
            self._busy += duration
            self._scheduled += batch.scheduled_tokens
        outputs, finished = sched.update(batch, now + duration, index)
        self._finished += len(finished)
        return StepResult(
            start=now,
            duration=duration,
            step_index=index,
            scheduled_tokens=batch.scheduled_tokens,
            prefill_tokens=batch.prefill_tokens,
            decode_tokens=batch.decode_tokens,
            num_requests=len(batch.requests),
            outputs=outputs,
            finished=tuple(finished),
            preempted=batch.preempted,
            admitted=batch.admitted,
            recomputed_tokens=batch.recomputed_tokens,
            context_tokens=batch.context_tokens,
        )

    def step_many(self, now: float, until: float, min_duration: float = 0.0) -> StepResult:
        """Run the step that starts at ``now``, then as many pure-decode steps
        (see :meth:`Scheduler.plan_decode`) as start strictly before ``until``,
        stopping after the first step that finishes a request and before one
        that would preempt or admit. Each step lasts ``max(duration,
        min_duration)`` and starts when the previous one ends.

        The result (see :class:`StepResult`) is what stepping one by one would
        have produced, provided nothing is added to or read from the engine
        before ``until``: a driver passes the time of its next event, and
        delivers the result at ``result.end``. With ``config.fast_forward``
        off this is a single :meth:`step`."""
        if not self.config.fast_forward:
            first = self.step(now)
            span = max(first.duration, min_duration)
            return first if span == first.duration else replace(first, end_time=now + span)
        sched = self._sched
        plan = sched.plan_decode()
        if plan is not None:
            # Already pure decode: the whole run, its first step included.
            run = self._decode_run(plan, now, until, min_duration, first=True)
            if run is not None:
                return run
        first = self.step(now)
        span = max(first.duration, min_duration)
        end = now + span
        plan = None
        if end < until and first.scheduled_tokens and not first.finished:
            plan = sched.plan_decode()
        run = None if plan is None else self._decode_run(plan, end, until, min_duration)
        if run is None:
            return first if span == first.duration else replace(first, end_time=end)
        outputs = dict(first.outputs)
        for rid, n in run.outputs.items():
            outputs[rid] = outputs.get(rid, 0) + n
        return replace(
            first,
            duration=run.end - now,
            scheduled_tokens=first.scheduled_tokens + run.scheduled_tokens,
            decode_tokens=first.decode_tokens + run.decode_tokens,
            outputs=outputs,
            finished=run.finished,
            context_tokens=first.context_tokens + run.context_tokens,
            num_steps=1 + run.num_steps,
            end_time=run.end,
        )

    def _decode_run(
        self, plan: DecodePlan, start: float, until: float, min_duration: float, first: bool = False
    ) -> StepResult | None:
        """Run the steps of ``plan`` that start before ``until`` (the one at
        ``start`` regardless if ``first``) and book them; None if none can run."""
        duration = self._duration
        nreq = plan.num_requests
        ctx = plan.context_tokens
        allocs = plan.allocs
        bs = len(allocs)
        free = plan.free_blocks
        limit = plan.max_steps
        durations: list[float] = []
        finish_times: list[float] = []
        end = start
        while len(durations) < limit and (end < until or (first and not durations)):
            free -= allocs[len(durations) % bs]
            if free < 0:
                break  # this step would preempt: leave it to step()
            d = duration(nreq, ctx)
            ctx += nreq
            durations.append(d)
            finish_times.append(end + d)
            end = end + max(d, min_duration)
        if not durations:
            return None
        k, outputs, finished = self._sched.run_decode(plan, len(durations), finish_times)
        if not k:
            return None
        # Book the k steps run, in the same order and arithmetic as one by one.
        index = self._steps
        end = start
        ctx = plan.context_tokens
        context = 0
        busy = self._busy
        for d in durations[:k]:
            busy += d
            context += ctx
            ctx += nreq
            end = end + max(d, min_duration)
        self._steps += k
        self._busy = busy
        self._scheduled += nreq * k
        self._finished += len(finished)
        return StepResult(
            start=start,
            duration=end - start,
            step_index=index,
            scheduled_tokens=nreq * k,
            prefill_tokens=0,
            decode_tokens=nreq * k,
            num_requests=nreq,
            outputs=outputs,
            finished=tuple(finished),
            preempted=(),
            admitted=(),
            recomputed_tokens=0,
            context_tokens=context,
            num_steps=k,
            end_time=end,
        )

    # -- observation ---------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._sched.running)

    @property
    def num_waiting(self) -> int:
        return len(self._sched.waiting)

    @property
    def kv_usage(self) -> float:
        return self._sched.pool.usage

    def cached_prefix_tokens(self, prompt: TokenSeq) -> int:
        """Tokens of ``prompt`` the prefix cache would serve right now (no side
        effects; the last token never counts, as at admission)."""
        if not self.config.enable_prefix_caching or len(prompt) < 2:
            return 0
        bs = self.config.block_size
        max_hit = (len(prompt) - 1) // bs
        pool = self._sched.pool
        return len(pool.lookup(pool.content_ids(prompt, max_hit), max_hit)) * bs

    def signal(self, now: float) -> EngineSignal:
        """The reading vLLM's ``/metrics`` would give now."""
        s = self._sched
        return EngineSignal(
            timestamp=now,
            kv_usage=s.pool.usage,
            running=len(s.running),
            waiting=len(s.waiting),
            preemptions_total=float(s.preemptions),
            prefix_hits_total=float(s.prefix_hits),
            prefix_queries_total=float(s.prefix_queries),
            kv_capacity_tokens=self.config.kv_capacity_tokens,
            engines=1,
        )

    @property
    def stats(self) -> EngineStats:
        s = self._sched
        return EngineStats(
            steps=self._steps,
            busy_time=self._busy,
            scheduled_tokens=self._scheduled,
            prefill_tokens=s.prefill_tokens,
            decode_tokens=s.decode_tokens,
            cached_tokens=s.cached_tokens,
            recomputed_tokens=s.recomputed_tokens,
            output_tokens=s.output_tokens,
            preemptions=s.preemptions,
            evicted_blocks=s.pool.evictions,
            prefix_queries=s.prefix_queries,
            prefix_hits=s.prefix_hits,
            requests_added=self._added,
            requests_finished=self._finished,
            requests_aborted=self._aborted,
        )
