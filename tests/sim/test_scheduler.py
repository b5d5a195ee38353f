"""vLLM V1 scheduling semantics of the simulated engine's scheduler."""

from __future__ import annotations

import random

import pytest

from concur.sim.blocks import TokenSeq, VirtualSegment, output_segment
from concur.sim.scheduler import EngineRequest, RequestStatus, ScheduleBatch, Scheduler

V = VirtualSegment


def req(
    rid: str, prompt_tokens: int, max_tokens: int, known: int = 0, priority: int = 0
) -> EngineRequest:
    return EngineRequest(rid, TokenSeq([V(rid, prompt_tokens)]), max_tokens, known, priority)


def step(s: Scheduler, index: int = 0) -> ScheduleBatch:
    batch = s.schedule(float(index))
    s.update(batch, float(index) + 1.0, index)
    return batch


def plan(batch: ScheduleBatch) -> dict[str, int]:
    return {r.request_id: n for r, n in zip(batch.requests, batch.num_tokens, strict=True)}


def test_preempts_most_recently_admitted_and_requeues_it_first() -> None:
    # 6 usable blocks of 16 tokens. A, B, C (31-token prompts) need 2 blocks
    # each, so all three fit and fill the pool; D waits.
    s = Scheduler(num_blocks=7, max_num_batched_tokens=1000)
    for rid in "ABC":
        s.add_request(req(rid, 31, 10), 0.0)
    b1 = step(s, 0)
    assert plan(b1) == {"A": 31, "B": 31, "C": 31}
    assert b1.admitted == ("A", "B", "C")
    s.add_request(req("D", 31, 10), 1.0)
    # Step 2: each decodes position 31 (the 32nd token): still 2 blocks each.
    b2 = step(s, 1)
    assert plan(b2) == {"A": 1, "B": 1, "C": 1}
    assert s.pool.num_free_blocks == 0
    # Step 3: position 32 needs a third block. A cannot grow: the most recently
    # admitted request (C) is preempted; its 2 blocks serve A and B.
    b3 = step(s, 2)
    assert b3.preempted == ("C",)
    assert plan(b3) == {"A": 1, "B": 1}
    assert [r.request_id for r in s.running] == ["A", "B"]
    # C goes to the front of the waiting queue, ahead of D, keeping its output.
    assert [r.request_id for r in s.waiting] == ["C", "D"]
    c = s.requests["C"]
    assert c.status is RequestStatus.PREEMPTED
    assert c.num_computed == 0
    assert c.num_output == 2
    assert len(c.blocks) == 0
    assert s.preemptions == 1
    # No admission in a step that preempted (even though budget was left).
    assert b3.admitted == ()


def test_priority_policy_admits_lowest_priority_first_then_arrival() -> None:
    s = Scheduler(num_blocks=3, max_num_batched_tokens=1000, policy="priority")
    for rid, prio, at in (("A", 2, 0.0), ("B", 0, 1.0), ("C", 2, 0.5), ("D", 0, 0.5)):
        s.add_request(req(rid, 20, 5, priority=prio), at)
    assert [r.request_id for r in s.waiting] == ["D", "B", "A", "C"]
    # Two usable blocks: only the head (D) fits; FCFS would have taken A.
    assert step(s).admitted == ("D",)
    fcfs = Scheduler(num_blocks=3, max_num_batched_tokens=1000)
    for rid in "ABCD":
        fcfs.add_request(req(rid, 20, 5), 0.0)
    assert step(fcfs).admitted == ("A",)


def test_priority_policy_preempts_the_greatest_priority_giving_back_its_tokens() -> None:
    # 6 usable blocks. A (priority 2) and B (priority 3) run; D (priority 0) comes later
    # and is admitted last. When D needs a third block, FCFS would preempt D itself (the
    # most recently admitted); by priority the victim is B, already scheduled in this step
    # for a token that goes back to the budget.
    s = Scheduler(num_blocks=7, max_num_batched_tokens=1000, policy="priority")
    s.add_request(req("A", 20, 30, priority=2), 0.0)
    s.add_request(req("B", 20, 30, priority=3), 0.0)
    assert step(s, 0).admitted == ("A", "B")
    s.add_request(req("D", 31, 10, priority=0), 1.0)
    assert step(s, 1).admitted == ("D",)
    step(s, 2)  # D decodes position 31: its two blocks are full
    assert s.pool.num_free_blocks == 0
    b = step(s, 3)
    assert b.preempted == ("B",)
    assert plan(b) == {"A": 1, "D": 1}
    assert (b.scheduled_tokens, b.decode_tokens, b.prefill_tokens) == (2, 2, 0)
    assert b.context_tokens == (20 + 3) + (31 + 2)
    assert [r.request_id for r in s.running] == ["A", "D"]
    assert [r.request_id for r in s.waiting] == ["B"]
    assert s.requests["B"].prefill_tokens == 20  # its taken-back token is not booked


def test_unknown_scheduling_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="'fcfs' or 'priority'"):
        Scheduler(num_blocks=7, policy="lifo")  # type: ignore[arg-type]


def test_growth_into_a_full_pool_preempts_the_newer_request() -> None:
    # 4 usable blocks; A and B (31 tokens each) hold 2 blocks each.
    s = Scheduler(num_blocks=5, max_num_batched_tokens=1000)
    s.add_request(req("A", 31, 10), 0.0)
    s.add_request(req("B", 31, 10), 0.0)
    step(s, 0)
    step(s, 1)
    # Both need a third block and none is free: A, served first, preempts B.
    b = step(s, 2)
    assert b.preempted == ("B",)
    assert plan(b) == {"A": 1}
    assert len(s.requests["A"].blocks) == 3
    assert [r.request_id for r in s.waiting] == ["B"]


def test_resumed_request_recomputes_prompt_and_outputs() -> None:
    s = Scheduler(num_blocks=7, max_num_batched_tokens=1000)
    for rid in "ABC":
        s.add_request(req(rid, 31, 10), 0.0)
    for i in range(3):
        step(s, i)  # C is preempted in the third step: 32 computed, 2 outputs
    c = s.requests["C"]
    assert (c.num_computed, c.num_output, c.high_water) == (0, 2, 32)
    i = 3
    while c.status is not RequestStatus.RUNNING:
        step(s, i)
        i += 1
    # A and B reused C's freed blocks (evicting them), so C recomputes its
    # whole sequence, prompt and outputs: 33 tokens, 32 of them computed before.
    assert c.num_computed == 33
    assert c.num_output == 3
    assert c.recomputed_tokens == 32
    assert c.prefill_tokens == 31 + 33
    assert c.preemptions == 1
    # Re-admissions are not prefix-cache queries (vLLM counts them apart).
    assert s.prefix_queries == 3 * 31
    assert s.recomputed_tokens == 32


def test_chunked_prefill_respects_token_budget() -> None:
    s = Scheduler(num_blocks=100, max_num_batched_tokens=100)
    s.add_request(req("A", 250, 2), 0.0)
    s.add_request(req("B", 30, 2), 0.0)
    assert plan(step(s, 0)) == {"A": 100}
    assert plan(step(s, 1)) == {"A": 100}
    b3 = step(s, 2)
    assert plan(b3) == {"A": 50, "B": 30}
    assert b3.scheduled_tokens == 80
    assert b3.prefill_tokens == 80 and b3.decode_tokens == 0
    # A produced its first token only after its last chunk.
    assert s.requests["A"].num_output == 1
    b4 = step(s, 3)
    assert plan(b4) == {"A": 1, "B": 1}
    assert b4.decode_tokens == 2


def test_a_batch_counts_the_attention_of_its_prefill_chunks() -> None:
    s = Scheduler(num_blocks=100, max_num_batched_tokens=100)
    s.add_request(req("A", 250, 2), 0.0)
    s.add_request(req("B", 30, 2), 0.0)
    b1, b2, b3 = step(s, 0), step(s, 1), step(s, 2)
    # A chunk of n tokens after c computed ones: n x c query-key pairs with the
    # earlier tokens, n (n + 1) / 2 among its own tokens.
    assert (b1.prefill_pairs, b1.prefill_context) == (100 * 101 // 2, 100)
    assert (b2.prefill_pairs, b2.prefill_context) == (100 * 100 + 100 * 101 // 2, 200)
    assert b3.prefill_pairs == (50 * 200 + 50 * 51 // 2) + 30 * 31 // 2
    assert b3.prefill_context == 250 + 30 == b3.context_tokens
    b4 = step(s, 3)  # decode only: no prefill attention, the context is all decode reads
    assert (b4.prefill_pairs, b4.prefill_context) == (0, 0)
    assert b4.context_tokens == 251 + 31


def test_running_requests_are_served_before_waiting_ones() -> None:
    s = Scheduler(num_blocks=100, max_num_batched_tokens=64)
    s.add_request(req("A", 200, 2), 0.0)
    step(s, 0)
    s.add_request(req("B", 10, 2), 1.0)
    # A (running, 136 tokens left) takes the whole budget: B waits.
    assert plan(step(s, 1)) == {"A": 64}
    assert s.requests["B"].status is RequestStatus.WAITING


def test_admission_requires_the_whole_prompt_to_fit() -> None:
    # 10 usable blocks. A's prompt needs 6, B's 5: 11 > 10, so B waits although
    # the 16-token chunk the budget leaves it would fit in the 4 free blocks.
    s = Scheduler(num_blocks=11, max_num_batched_tokens=112)
    s.add_request(req("A", 96, 10), 0.0)
    s.add_request(req("B", 80, 5), 0.0)
    b = step(s, 0)
    assert plan(b) == {"A": 96}
    assert s.pool.num_free_blocks == 4
    assert s.requests["B"].status is RequestStatus.WAITING
    for i in range(1, 10):
        assert plan(step(s, i)) == {"A": 1}
    # A finished after its 10th output; only then B gets in.
    assert "A" not in s.requests
    assert plan(step(s, 10)) == {"B": 80}

    # Without the reservation (vLLM's scheduler_reserve_full_isl=False) B is
    # admitted on its first chunk; next step it cannot grow and, being the
    # newest running request, it is its own victim.
    lax = Scheduler(num_blocks=11, max_num_batched_tokens=112, reserve_full_isl=False)
    lax.add_request(req("A", 96, 10), 0.0)
    lax.add_request(req("B", 80, 5), 0.0)
    b = step(lax, 0)
    assert plan(b) == {"A": 96, "B": 16}
    assert lax.pool.num_free_blocks == 3
    b = step(lax, 1)
    assert b.preempted == ("B",)
    assert plan(b) == {"A": 1}
    assert lax.preemptions == 1


def test_waiting_queue_is_fifo_without_skipping() -> None:
    s = Scheduler(num_blocks=11, max_num_batched_tokens=1000)
    s.add_request(req("A", 112, 40), 0.0)  # 7 blocks
    s.add_request(req("B", 80, 5), 0.0)  # 5 blocks: does not fit
    s.add_request(req("C", 16, 5), 0.0)  # 1 block: would fit, but B is first
    b = step(s, 0)
    assert plan(b) == {"A": 112}
    assert [r.request_id for r in s.waiting] == ["B", "C"]


def test_max_num_seqs_caps_running_requests() -> None:
    s = Scheduler(num_blocks=100, max_num_seqs=2)
    for rid in "ABC":
        s.add_request(req(rid, 20, 3), 0.0)
    b = step(s, 0)
    assert plan(b) == {"A": 20, "B": 20}
    assert [r.request_id for r in s.waiting] == ["C"]
    step(s, 1)
    step(s, 2)  # A and B finish (3 outputs)
    assert s.running == []
    assert plan(step(s, 3)) == {"C": 20}


def test_prefix_hits_are_whole_blocks_and_never_the_last_token() -> None:
    s = Scheduler(num_blocks=100)
    base = TokenSeq([V("ctx", 32)])
    s.add_request(EngineRequest("r0", base, 1), 0.0)
    step(s, 0)  # computes 32 tokens: 2 full blocks cached, finishes
    assert (s.prefix_queries, s.prefix_hits) == (32, 0)
    # Same 32 tokens again: the last token must be recomputed, so only one
    # block (16 tokens) hits.
    s.add_request(EngineRequest("r1", base.copy(), 1), 1.0)
    b = step(s, 1)
    assert plan(b) == {"r1": 16}
    assert (s.prefix_queries, s.prefix_hits) == (64, 16)
    # 33 tokens: both full blocks hit, 1 token computed.
    s.add_request(EngineRequest("r2", base.extended(V("x", 1)), 1), 2.0)
    b = step(s, 2)
    assert plan(b) == {"r2": 1}
    assert (s.prefix_queries, s.prefix_hits) == (97, 48)
    assert s.cached_tokens == 48


def test_recomputed_tokens_count_known_prefix_only() -> None:
    s = Scheduler(num_blocks=100)
    # Agent already computed 40 tokens before; none are cached here.
    s.add_request(req("A", 50, 1, known=40), 0.0)
    b = step(s, 0)
    assert b.recomputed_tokens == 40
    assert b.prefill_tokens == 50
    assert s.recomputed_tokens == 40


def test_add_request_validation() -> None:
    s = Scheduler(num_blocks=5)  # 4 usable blocks = 64 tokens
    s.add_request(req("A", 10, 5), 0.0)
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("A", 10, 5), 0.0)
    with pytest.raises(ValueError, match="need 5 KV blocks but the engine has 4"):
        s.add_request(req("B", 60, 20), 0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(req("C", 10, 0), 0.0)
    with pytest.raises(ValueError, match="empty prompt"):
        s.add_request(EngineRequest("D", TokenSeq(), 5), 0.0)
    with pytest.raises(ValueError, match="block_size"):
        s.add_request(EngineRequest("E", TokenSeq([V("e", 5)], block_size=32), 5), 0.0)


def test_abort_frees_blocks_from_running_and_waiting() -> None:
    s = Scheduler(num_blocks=11)
    s.add_request(req("A", 100, 50), 0.0)
    s.add_request(req("B", 100, 50), 0.0)
    step(s, 0)
    assert s.pool.num_free_blocks == 3
    assert s.abort("B") is True  # waiting
    assert s.abort("A") is True  # running
    assert s.abort("A") is False
    assert s.pool.num_free_blocks == 10
    assert not s.has_work()


def _agent_swarm(
    memoise: bool, seed: int
) -> list[tuple[dict[str, int], tuple[str, ...], int, int]]:
    """16 agents with a shared prefix re-sending growing contexts into a
    2,064-token cache; returns every step's schedule and pool state."""
    rng = random.Random(seed)
    s = Scheduler(num_blocks=130, max_num_batched_tokens=256, max_num_seqs=16)
    s._memoise_blocked = memoise
    contexts = {a: TokenSeq([V("sys", 48), V(f"{a}:in0", rng.randint(20, 300))]) for a in range(12)}
    steps_left = {a: rng.randint(2, 5) for a in contexts}
    known = dict.fromkeys(contexts, 0)
    pending: list[tuple[int, int]] = []  # (step index to submit at, agent)
    for a in contexts:
        s.add_request(EngineRequest(f"{a}#0", contexts[a], rng.randint(5, 60)), 0.0)
    log: list[tuple[dict[str, int], tuple[str, ...], int, int]] = []
    i = 0
    while s.has_work() or pending:
        for when, a in [p for p in pending if p[0] <= i]:
            pending.remove((when, a))
            k = 5 - steps_left[a]
            contexts[a] = contexts[a].extended(V(f"{a}:in{k}", rng.randint(10, 200)))
            s.add_request(
                EngineRequest(f"{a}#{k}", contexts[a], rng.randint(5, 60), known[a]), float(i)
            )
        batch = s.schedule(float(i))
        _, fins = s.update(batch, float(i) + 1, i)
        log.append((plan(batch), batch.preempted, s.pool.num_free_blocks, s.pool.evictions))
        for f in fins:
            a = int(f.request_id.split("#")[0])
            contexts[a] = contexts[a].extended(output_segment(f.request_id, f.output_tokens))
            known[a] = f.kv_tokens
            steps_left[a] -= 1
            if steps_left[a] > 0:
                pending.append((i + rng.randint(1, 30), a))
        i += 1
    return log


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blocked_admission_memo_changes_nothing(seed: int) -> None:
    with_memo = _agent_swarm(True, seed)
    without = _agent_swarm(False, seed)
    assert with_memo == without
    # The run is congested enough to preempt, evict and block admissions.
    assert len(with_memo) > 300
    assert any(entry[1] for entry in with_memo)
    assert with_memo[-1][3] > 500
