"""vLLM V1's scheduling loop over the simulated block pool.

Follows ``Scheduler.schedule`` in ``vllm/v1/core/sched/scheduler.py`` (vLLM 0.32,
chunked prefill on, no speculative decoding, no KV connector,
``long_prefill_token_threshold`` 0), with either scheduling policy (``--scheduling-policy``):
first come first served (the default) or ``priority``. What the priority policy changes
is said after each point.

1. Running requests first, in admission order, while the token budget
   (``max_num_batched_tokens``) lasts: each gets ``min(tokens it still lacks,
   budget)`` tokens (1 for a decoding request, the next chunk for a prefilling
   one). If its new blocks do not fit, the *last* running request (the most
   recently admitted) is preempted, repeatedly, until they fit; if it has to
   preempt itself, the running pass stops. *Priority:* the victim is the running
   request with the greatest (priority, arrival time), the first in running order on a
   tie; if it was already scheduled in this step, its tokens go back to the budget.
2. Only if nothing was preempted in this step: waiting requests in FIFO order,
   while the budget lasts and fewer than ``max_num_seqs`` run. A request's
   prefix-cache hit is looked up (full blocks only, never its last token:
   ``max_cache_hit_length = num_tokens - 1``); with ``reserve_full_isl`` (vLLM's
   ``scheduler_reserve_full_isl``, default True) it is admitted only if blocks for
   its *whole* current sequence fit, counting hit blocks that sit in the free queue
   as needed. The first request that does not fit stops the pass (no skipping).
   *Priority:* the queue is ordered by (priority, arrival time, request id), lowest
   first, and a preempted request takes its place in that order.
3. Preemption is by recompute: the victim's blocks are freed (tail first), its
   computed tokens reset to 0, and it goes to the *front* of the waiting queue
   with its outputs so far kept as part of its sequence.

Blocks for the tokens a step computes are hashed and cached when the step is
scheduled (``allocate_slots`` -> ``cache_blocks``), as in vLLM.

Runs of pure-decode steps (:meth:`Scheduler.plan_decode`,
:meth:`Scheduler.run_decode`) are applied at once, with the same block
allocations, cached blocks and finishes as the same number of
:meth:`Scheduler.schedule` + :meth:`Scheduler.update` calls.

Prefix-cache counters follow vLLM's ``PrefixCacheStats``: recorded when a
request is admitted, in tokens (queries = its sequence length, hits = cached
tokens), and only for first admissions; re-admissions after preemption are not
exported by vLLM's ``/metrics`` and are not counted here either.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal, get_args

import numpy as np

from concur.sim.blocks import EMPTY_BLOCKS, BlockArray, BlockPool, TokenSeq, output_key

__all__ = [
    "SCHEDULING_POLICIES",
    "DecodePlan",
    "EngineRequest",
    "FinishedRequest",
    "RequestState",
    "RequestStatus",
    "ScheduleBatch",
    "Scheduler",
    "SchedulingPolicy",
]

SchedulingPolicy = Literal["fcfs", "priority"]
"""vLLM's ``--scheduling-policy``: first come first served, or by each request's
``priority`` (lowest first)."""
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = get_args(SchedulingPolicy)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A request to the engine.

    ``prompt`` is copied on :meth:`Scheduler.add_request`; the caller may keep
    extending its own object. The engine appends the request's outputs to its
    copy as ``VirtualSegment(output_key(request_id), n)`` (see
    :func:`concur.sim.blocks.output_segment`), so request ids must be unique
    within a run.

    ``known_prefix_tokens`` is how many leading prompt tokens the caller (the
    agent) already had computed by earlier requests; computing any of them again
    counts as *recomputed*. Pass the previous request's
    :attr:`FinishedRequest.kv_tokens`.
    """

    request_id: str
    prompt: TokenSeq
    max_tokens: int
    known_prefix_tokens: int = 0
    priority: int = 0
    """The request body's ``priority``: the order of the ``priority`` scheduling policy
    (lowest first); the first-come-first-served policy ignores it."""


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """What the engine reports about a request that produced ``max_tokens``."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    """Prefix-cache hit (tokens) at its first admission, as vLLM reports in usage."""
    prefill_tokens: int
    """Prompt tokens (and, after preemption, output tokens) computed in total."""
    recomputed_tokens: int
    """Tokens computed that had been computed before: within ``known_prefix_tokens``
    or re-prefilled after a preemption."""
    preemptions: int
    arrival_time: float
    first_scheduled_time: float
    first_token_time: float
    """End of the step that produced the first output token."""
    first_token_step: int
    """Index (engine step counter) of that step."""
    finish_time: float
    kv_tokens: int
    """Tokens whose KV was computed: prompt + output - 1 (the last output token is
    sampled, never fed back). Pass it as the next request's ``known_prefix_tokens``."""

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float:
        return self.finish_time - self.arrival_time


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


class RequestState:
    """The engine's mutable view of one request (internal; read-only for callers)."""

    __slots__ = (
        "arrival_time",
        "blocks",
        "cached_tokens_first",
        "first_scheduled_time",
        "first_token_step",
        "first_token_time",
        "high_water",
        "known_prefix",
        "max_tokens",
        "num_cached_blocks",
        "num_computed",
        "num_output",
        "num_prompt",
        "out_key",
        "preemptions",
        "prefill_tokens",
        "priority",
        "recomputed_tokens",
        "request_id",
        "seq",
        "status",
    )

    def __init__(self, req: EngineRequest, seq: TokenSeq, now: float) -> None:
        self.request_id = req.request_id
        self.seq = seq  # prompt + outputs; outputs appended lazily (Scheduler._seq)
        self.out_key = output_key(req.request_id)
        self.num_prompt = len(seq)
        self.max_tokens = req.max_tokens
        self.known_prefix = req.known_prefix_tokens
        self.num_output = 0
        self.num_computed = 0
        self.high_water = 0  # most tokens ever computed, as of the last preemption
        self.blocks: BlockArray = EMPTY_BLOCKS
        self.num_cached_blocks = 0
        self.status = RequestStatus.WAITING
        self.arrival_time = now
        self.priority = req.priority
        self.preemptions = 0
        self.cached_tokens_first = -1
        self.prefill_tokens = 0
        self.recomputed_tokens = 0
        self.first_scheduled_time = -1.0
        self.first_token_time = -1.0
        self.first_token_step = -1

    @property
    def num_tokens(self) -> int:
        return self.num_prompt + self.num_output

    def __repr__(self) -> str:
        return (
            f"RequestState({self.request_id!r}, {self.status.value}, prompt={self.num_prompt}, "
            f"out={self.num_output}/{self.max_tokens}, computed={self.num_computed}, "
            f"blocks={len(self.blocks)})"
        )


@dataclass(frozen=True, slots=True)
class ScheduleBatch:
    """One step's schedule: ``requests[i]`` computes ``num_tokens[i]`` tokens."""

    requests: tuple[RequestState, ...]
    num_tokens: tuple[int, ...]
    scheduled_tokens: int
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int
    """Sum over scheduled requests of the tokens they attend over (KV read)."""
    prefill_pairs: int
    """Attention (query, key) pairs of the prefill chunks: a chunk of ``n`` tokens after
    ``c`` computed ones has ``n x c + n (n + 1) / 2``; a decode token's pairs are its
    context, already in ``context_tokens``."""
    prefill_context: int
    """The part of ``context_tokens`` that belongs to prefill chunks."""
    recomputed_tokens: int
    preempted: tuple[str, ...]
    admitted: tuple[str, ...]


class DecodePlan:
    """The pure-decode steps that can follow the current state (see
    :meth:`Scheduler.plan_decode`); hand it back to :meth:`Scheduler.run_decode`
    before anything else touches the scheduler.

    Step ``j`` (0-based) schedules every running request for one token, reads
    ``context_tokens + j * num_requests`` KV tokens and allocates
    ``allocs[j % block_size]`` new blocks.
    """

    __slots__ = (
        "actions",
        "allocs",
        "context_tokens",
        "free_blocks",
        "max_steps",
        "num_requests",
        "watch",
    )

    def __init__(
        self,
        num_requests: int,
        context_tokens: int,
        max_steps: int,
        free_blocks: int,
        allocs: list[int],
        actions: list[list[tuple[RequestState, bool]]],
        watch: bool,
    ) -> None:
        self.num_requests = num_requests
        self.context_tokens = context_tokens
        """KV tokens the first step reads (sum of the requests' sequence lengths)."""
        self.max_steps = max_steps
        """Steps until, and including, the first one that finishes a request."""
        self.free_blocks = free_blocks
        """Free blocks now; a step whose allocations exceed what is left would preempt."""
        self.allocs = allocs
        self.actions = actions
        """Per phase ``j % block_size``: (request, True = allocate a block /
        False = cache its newly full block), in running order."""
        self.watch = watch
        """Whether caching a watched content id (see :meth:`BlockPool.watch`)
        would reopen the blocked admission check of the waiting queue's head."""

    def steps_within_blocks(self, max_steps: int) -> int:
        """How many of the first ``max_steps`` steps run without preempting."""
        allocs = self.allocs
        bs = len(allocs)
        free = self.free_blocks
        for j in range(min(max_steps, self.max_steps)):
            free -= allocs[j % bs]
            if free < 0:
                return j
        return min(max_steps, self.max_steps)


def _queue_order(r: RequestState) -> tuple[int, float, str]:
    return (r.priority, r.arrival_time, r.request_id)


def _preempt_order(r: RequestState) -> tuple[int, float]:
    return (r.priority, r.arrival_time)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Waiting queue, running list and block pool of one simulated engine."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        reserve_full_isl: bool = True,
        watermark: float = 0.0,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        policy: SchedulingPolicy = "fcfs",
    ) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.reserve_full_isl = reserve_full_isl
        self.watermark_blocks = int(watermark * num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self._by_priority = policy == "priority"
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.requests: dict[str, RequestState] = {}
        # (head request, pool epoch, blocks it required) of the last admission
        # check that failed on the full-sequence reservation.
        self._blocked: tuple[RequestState, int, int] | None = None
        self._memoise_blocked = True  # tests switch it off to check it is exact
        # Counters.
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.cached_tokens = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.recomputed_tokens = 0
        self.output_tokens = 0

    # -- requests ------------------------------------------------------------

    def add_request(self, req: EngineRequest, now: float) -> RequestState:
        rid = req.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in the engine")
        if req.prompt.block_size != self.block_size:
            raise ValueError(
                f"request {rid!r}: prompt block_size {req.prompt.block_size} != engine "
                f"block_size {self.block_size}"
            )
        n = len(req.prompt)
        if n < 1:
            raise ValueError(f"request {rid!r}: empty prompt")
        if req.max_tokens < 1:
            raise ValueError(f"request {rid!r}: max_tokens must be >= 1, got {req.max_tokens}")
        if req.known_prefix_tokens < 0:
            raise ValueError(f"request {rid!r}: known_prefix_tokens must be >= 0")
        if self.max_model_len is not None and n + req.max_tokens > self.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt {n} + max_tokens {req.max_tokens} exceeds "
                f"max_model_len {self.max_model_len}"
            )
        need = _cdiv(n + req.max_tokens - 1, self.block_size)
        usable = self.pool.num_usable_blocks
        if need > usable:
            raise ValueError(
                f"request {rid!r}: prompt {n} + max_tokens {req.max_tokens} tokens need "
                f"{need} KV blocks but the engine has {usable}; give the engine more KV "
                f"capacity or send shorter requests"
            )
        # Hash (and intern) the caller's prompt in place before copying it:
        # hashes depend on content only, so the caller's object keeps them and
        # a context that is extended step after step is hashed once overall.
        if self.enable_prefix_caching:
            self.pool.content_ids(req.prompt, req.prompt.num_full_blocks)
        state = RequestState(req, req.prompt.copy(), now)
        self.requests[rid] = state
        self._enqueue(state, preempted=False)
        return state

    def abort(self, request_id: str) -> bool:
        """Drop a live request, freeing its blocks. False if unknown/finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        if state.status is RequestStatus.RUNNING:
            self.running.remove(state)
        else:
            self.waiting.remove(state)
        self._free(state)
        state.status = RequestStatus.ABORTED
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _free(self, state: RequestState) -> None:
        self.pool.free_request(state.blocks, state.num_cached_blocks)
        state.blocks = EMPTY_BLOCKS
        state.num_cached_blocks = 0

    def _preempt(self, state: RequestState) -> None:
        # Caller has removed ``state`` from ``running``.
        if state.num_computed > state.high_water:
            state.high_water = state.num_computed
        self._free(state)
        state.num_computed = 0
        state.preemptions += 1
        state.status = RequestStatus.PREEMPTED
        self._enqueue(state, preempted=True)
        self.preemptions += 1

    def _enqueue(self, state: RequestState, *, preempted: bool) -> None:
        """Into the waiting queue: first come first served puts a new request at the back
        and a preempted one at the front; by priority, each goes to its place in
        (priority, arrival time, request id), the order vLLM's priority queue pops in."""
        waiting = self.waiting
        if self._by_priority:
            key = _queue_order(state)
            waiting.insert(bisect.bisect_right(waiting, key, key=_queue_order), state)
        elif preempted:
            waiting.appendleft(state)
        else:
            waiting.append(state)

    def _victim(self, running: list[RequestState]) -> tuple[RequestState, int]:
        """Take out the running request a full cache preempts, with its index: the most
        recently admitted, or by priority the greatest (priority, arrival time), the
        first in running order on a tie (as ``max`` keeps it)."""
        if self._by_priority:
            victim = max(running, key=_preempt_order)
            at = running.index(victim)
            del running[at]
            return victim, at
        return running.pop(), len(running)

    # -- one step ------------------------------------------------------------

    @staticmethod
    def _seq(r: RequestState, num_tokens: int) -> TokenSeq:
        """``r``'s sequence brought up to date: outputs are appended lazily, when
        their blocks need hashing, not one token at a time."""
        seq = r.seq
        lag = num_tokens - len(seq)
        if lag:
            seq.grow(r.out_key, lag)
        return seq

    @staticmethod
    def _recomputed(r: RequestState, start: int, end: int) -> int:
        """How many tokens of the prefill chunk [start, end) ``r`` computes again: those
        below the agent's known prefix or below the highest position this request had
        computed before a preemption."""
        hw = r.high_water
        limit = r.known_prefix if r.known_prefix > hw else hw
        if limit <= start:
            return 0
        return (end if end < limit else limit) - start

    @staticmethod
    def _account_prefill(r: RequestState, start: int, end: int) -> int:
        """Book a prefill chunk [start, end) on ``r``; returns its recomputed tokens."""
        rec = Scheduler._recomputed(r, start, end)
        r.recomputed_tokens += rec
        r.prefill_tokens += end - start
        return rec

    @staticmethod
    def _take_back(r: RequestState, n: int) -> tuple[bool, int, int]:
        """Undo the booking of ``n`` tokens scheduled for running request ``r`` in this
        step (it is being preempted before the step runs): (whether they were a decode
        token, their attention pairs if a prefill chunk, their recomputed tokens)."""
        comp = r.num_computed
        end = comp + n
        if n == 1 and r.num_output and end == r.num_prompt + r.num_output:
            return True, 0, 0
        rec = Scheduler._recomputed(r, comp, end)
        r.recomputed_tokens -= rec
        r.prefill_tokens -= n
        return False, n * comp + n * (n + 1) // 2, rec

    def schedule(self, now: float) -> ScheduleBatch:
        """Choose this step's work, allocate and cache its blocks."""
        bs = self.block_size
        pool = self.pool
        caching = self.enable_prefix_caching
        budget = self.max_num_batched_tokens
        running = self.running
        reqs: list[RequestState] = []
        counts: list[int] = []
        preempted: list[str] = []
        admitted: list[str] = []
        prefill = decode = context = recomputed = 0
        pairs = prefill_context = 0  # attention of the prefill chunks (see ScheduleBatch)

        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            comp = r.num_computed
            ntok = r.num_prompt + r.num_output
            n = ntok - comp
            if n > budget:
                n = budget
            end = comp + n
            need = (end + bs - 1) // bs - len(r.blocks)
            if need > 0:
                if need > pool.num_free:
                    victim: RequestState | None = None
                    while need > pool.num_free:
                        victim, at = self._victim(running)
                        if at < i:  # scheduled earlier in this step: give its tokens back
                            k = reqs.index(victim)
                            del reqs[k]
                            vn = counts.pop(k)
                            budget += vn
                            context -= victim.num_computed + vn
                            was_decode, vpairs, vrec = self._take_back(victim, vn)
                            if was_decode:
                                decode -= 1
                            else:
                                prefill -= vn
                                pairs -= vpairs
                                prefill_context -= victim.num_computed + vn
                                recomputed -= vrec
                            i -= 1
                        self._preempt(victim)
                        preempted.append(victim.request_id)
                        if victim is r:
                            break
                    if victim is r:
                        break
                if need == 1:
                    r.blocks = np.append(r.blocks, pool.allocate_one())
                else:
                    r.blocks = np.concatenate((r.blocks, pool.allocate(need)))
            if caching:
                full = end // bs
                if full > r.num_cached_blocks:
                    nc = r.num_cached_blocks
                    ids = pool.content_ids(self._seq(r, ntok), full)
                    pool.cache_blocks(r.blocks[nc:full], ids[nc:full])
                    r.num_cached_blocks = full
            reqs.append(r)
            counts.append(n)
            budget -= n
            context += end
            if n == 1 and r.num_output and end == ntok:
                decode += 1
            else:
                prefill += n
                pairs += n * comp + n * (n + 1) // 2
                prefill_context += end
                recomputed += self._account_prefill(r, comp, end)
            i += 1

        if not preempted:
            waiting = self.waiting
            max_seqs = self.max_num_seqs
            reserve_full = self.reserve_full_isl
            while budget > 0 and waiting and len(running) < max_seqs:
                r = waiting[0]
                free = pool.num_free - (self.watermark_blocks if running else 0)
                blocked = self._blocked
                if (
                    blocked is not None
                    and blocked[0] is r
                    and blocked[1] == pool.epoch
                    and blocked[2] > free
                ):
                    # Still blocked: the full-sequence requirement can only have
                    # grown since it was computed (see BlockPool.epoch).
                    break
                ntok = r.num_prompt + r.num_output
                if caching:
                    max_hit = (ntok - 1) // bs
                    ids = pool.content_ids(self._seq(r, ntok), max_hit)
                    hit = pool.lookup(ids, max_hit)
                else:
                    hit = EMPTY_BLOCKS
                nhit = len(hit)
                comp = nhit * bs
                n = ntok - comp
                if n > budget:
                    n = budget
                end = comp + n
                evictable = pool.count_free(hit) if nhit else 0
                if reserve_full:
                    required = (ntok + bs - 1) // bs - nhit + evictable
                    if required > free:
                        if self._memoise_blocked:
                            if caching:
                                pool.watch(ids[: min(nhit + 1, max_hit)])
                            self._blocked = (r, pool.epoch, required)
                        break
                need = (end + bs - 1) // bs - nhit
                if need + evictable > free:
                    break
                # Admit.
                if blocked is not None:
                    self._blocked = None
                    pool.unwatch()
                waiting.popleft()
                if nhit:
                    pool.touch(hit)
                blocks = np.concatenate((hit, pool.allocate(need))) if need > 0 else hit
                r.blocks = blocks
                r.num_cached_blocks = nhit
                if caching:
                    full = end // bs
                    if full > nhit:
                        ids = pool.content_ids(r.seq, full)
                        pool.cache_blocks(blocks[nhit:full], ids[nhit:full])
                        r.num_cached_blocks = full
                if r.preemptions == 0:
                    self.prefix_queries += ntok
                    self.prefix_hits += comp
                    r.cached_tokens_first = comp
                    r.first_scheduled_time = now
                self.cached_tokens += comp
                r.num_computed = comp
                r.status = RequestStatus.RUNNING
                running.append(r)
                admitted.append(r.request_id)
                reqs.append(r)
                counts.append(n)
                budget -= n
                context += end
                if n == 1 and r.num_output and end == ntok:
                    decode += 1  # a resumed request whose sequence was all cached
                else:
                    prefill += n
                    pairs += n * comp + n * (n + 1) // 2
                    prefill_context += end
                    recomputed += self._account_prefill(r, comp, end)

        scheduled = self.max_num_batched_tokens - budget
        self.prefill_tokens += prefill
        self.decode_tokens += decode
        self.recomputed_tokens += recomputed
        return ScheduleBatch(
            requests=tuple(reqs),
            num_tokens=tuple(counts),
            scheduled_tokens=scheduled,
            prefill_tokens=prefill,
            decode_tokens=decode,
            context_tokens=context,
            prefill_pairs=pairs,
            prefill_context=prefill_context,
            recomputed_tokens=recomputed,
            preempted=tuple(preempted),
            admitted=tuple(admitted),
        )

    def update(
        self, batch: ScheduleBatch, end_time: float, step_index: int
    ) -> tuple[dict[str, int], list[FinishedRequest]]:
        """Apply a step's results: advance computed tokens, sample one token for
        every request whose sequence is now fully computed, finish requests
        that reached ``max_tokens``. Returns (new tokens per request, finished)."""
        outputs: dict[str, int] = {}
        finished: list[FinishedRequest] = []
        for r, n in zip(batch.requests, batch.num_tokens, strict=True):
            end = r.num_computed + n
            r.num_computed = end
            if end == r.num_prompt + r.num_output:
                r.num_output += 1
                outputs[r.request_id] = 1
                if r.first_token_step < 0:
                    r.first_token_time = end_time
                    r.first_token_step = step_index
                if r.num_output >= r.max_tokens:
                    finished.append(self._finish(r, end_time))
        self.output_tokens += len(outputs)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return outputs, finished

    # -- runs of pure-decode steps ------------------------------------------

    def plan_decode(self) -> DecodePlan | None:
        """The pure-decode steps that can run from the current state, or None if
        the next step is not one.

        A step is pure decode when every running request has all but its
        newest token computed (it samples one token; nothing to prefill) and
        the budget holds them all, and when no waiting request can be admitted:
        the queue is empty, or ``max_num_seqs`` requests run, or its head is
        blocked on the full-sequence reservation (``reserve_full_isl``) by the
        memoised check. Then :meth:`schedule` changes nothing but lengths,
        block allocations at block boundaries and the caching of blocks that
        fill up, so :meth:`run_decode` can apply a run of such steps at once,
        identically to stepping one by one. A blocked head stays blocked while
        blocks are only allocated (free blocks shrink, its requirement cannot
        shrink) unless caching a watched hash reopens it (see
        :meth:`BlockPool.watch`), which :meth:`run_decode` stops before."""
        running = self.running
        nreq = len(running)
        if not running or nreq > self.max_num_batched_tokens:
            return None
        pool = self.pool
        watch = False
        if (
            self.waiting
            and nreq < self.max_num_seqs
            and nreq < self.max_num_batched_tokens  # else no token budget left to admit
        ):
            blocked = self._blocked
            if (
                blocked is None
                or blocked[0] is not self.waiting[0]
                or blocked[1] != pool.epoch
                or blocked[2] <= pool.num_free - self.watermark_blocks
            ):
                return None
            watch = pool.watching()
        bs = self.block_size
        caching = self.enable_prefix_caching
        allocs = [0] * bs
        actions: list[list[tuple[RequestState, bool]]] = [[] for _ in range(bs)]
        max_steps = running[0].max_tokens
        context = 0
        for r in running:
            ntok = r.num_prompt + r.num_output
            comp = r.num_computed
            if comp != ntok - 1 or not r.num_output:
                return None
            left = r.max_tokens - r.num_output
            if left < max_steps:
                max_steps = left
            context += ntok
            # Step j computes position comp + j: a new block when it passes the
            # last allocated one, a cached block when it completes one.
            j = len(r.blocks) * bs - comp
            if not 0 <= j < bs:
                return None
            allocs[j] += 1
            actions[j].append((r, True))
            if caching:
                j = (r.num_cached_blocks + 1) * bs - comp - 1
                if not 0 <= j < bs:
                    return None
                actions[j].append((r, False))
        return DecodePlan(nreq, context, max_steps, pool.num_free, allocs, actions, watch)

    def run_decode(
        self, plan: DecodePlan, num_steps: int, end_times: Sequence[float]
    ) -> tuple[int, dict[str, int], list[FinishedRequest]]:
        """Apply up to ``num_steps`` steps of ``plan`` exactly as as many calls of
        :meth:`schedule` + :meth:`update` would; ``end_times[j]`` is when step
        ``j`` ends (the finish time of the requests it completes).
        ``num_steps`` must be within ``plan.steps_within_blocks(num_steps)``.

        Stops early, before a step that would cache a watched content id (that
        step must reconsider the waiting queue). Returns (steps applied,
        new tokens per request, finished requests)."""
        fit = plan.steps_within_blocks(num_steps)
        if not 0 < num_steps <= fit:
            raise ValueError(
                f"run_decode: num_steps={num_steps} but only {fit} steps of the plan can run "
                f"(before a finish or preemption); ask plan.steps_within_blocks first"
            )
        bs = self.block_size
        pool = self.pool
        allocate_one = pool.allocate_one
        cache_block = pool.cache_block
        content_ids = pool.content_ids
        seq_of = self._seq
        append = np.append
        actions = plan.actions
        watch = plan.watch
        # Blocks are handed out and cached step by step in running order, as
        # :meth:`schedule` does, so the pool ends in the very same state.
        for j in range(num_steps):
            phase = actions[j % bs]
            if watch and self._reopens(phase, j):
                num_steps = j
                break
            for r, alloc in phase:
                if alloc:
                    r.blocks = append(r.blocks, allocate_one())
                else:
                    nc = r.num_cached_blocks
                    ids = content_ids(seq_of(r, r.num_prompt + r.num_output + j), nc + 1)
                    cache_block(int(r.blocks[nc]), int(ids[nc]))
                    r.num_cached_blocks = nc + 1
        outputs: dict[str, int] = {}
        finished: list[FinishedRequest] = []
        if not num_steps:
            return 0, outputs, finished
        end_time = end_times[num_steps - 1]
        for r in self.running:
            r.num_computed += num_steps
            r.num_output += num_steps
            outputs[r.request_id] = num_steps
            if r.num_output >= r.max_tokens:
                finished.append(self._finish(r, end_time))
        tokens = plan.num_requests * num_steps
        self.decode_tokens += tokens
        self.output_tokens += tokens
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return num_steps, outputs, finished

    def _reopens(self, phase: list[tuple[RequestState, bool]], j: int) -> bool:
        """Would step ``j`` of a decode run cache a watched content id? (Hashing
        the blocks it completes is what that step's :meth:`schedule` does first.)"""
        pool = self.pool
        for r, alloc in phase:
            if not alloc:
                full = r.num_cached_blocks + 1
                seq = self._seq(r, r.num_prompt + r.num_output + j)
                if pool.watched(int(pool.content_ids(seq, full)[full - 1])):
                    return True
        return False

    def _finish(self, r: RequestState, now: float) -> FinishedRequest:
        r.status = RequestStatus.FINISHED
        self._free(r)
        del self.requests[r.request_id]
        return FinishedRequest(
            request_id=r.request_id,
            prompt_tokens=r.num_prompt,
            output_tokens=r.num_output,
            cached_tokens=max(r.cached_tokens_first, 0),
            prefill_tokens=r.prefill_tokens,
            recomputed_tokens=r.recomputed_tokens,
            preemptions=r.preemptions,
            arrival_time=r.arrival_time,
            first_scheduled_time=r.first_scheduled_time,
            first_token_time=r.first_token_time,
            first_token_step=r.first_token_step,
            finish_time=now,
            kv_tokens=r.num_prompt + r.num_output - 1,
        )
