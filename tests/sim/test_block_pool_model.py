"""The array-backed BlockPool against the one-object-per-block model of vLLM's
free queue (``tests/fakes/ref_block_pool.py``), operation by operation.

Random sequences of what the scheduler does (allocate, cache a request's full
blocks, look up and touch a prefix hit, free a request tail first, watch) run on
both pools; after every operation the free queue order, reference counts, the
cache map (duplicates included), evictions, epoch and usage must agree, and so
must every value returned.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from fakes.ref_block_pool import RefBlockPool
from hypothesis import given, settings
from hypothesis import strategies as st

from concur.policies import build_policy
from concur.sim import scheduler
from concur.sim.blocks import BlockPool
from concur.sim.engine import EngineModel
from concur.sim.engine_config import EngineSpec
from concur.sim.generate import generate
from concur.sim.runner import Runner


@dataclass
class _Request:
    blocks: list[int]
    ids: list[int] = field(default_factory=list)  # hashes of the first len(ids) blocks
    chain: int = 0


def _a(xs: list[int]) -> np.ndarray:
    return np.asarray(xs, np.int64)


def _same(new: BlockPool, ref: RefBlockPool, hashes_seen: set[int]) -> None:
    """The model is keyed by hash, the array pool by content id."""
    assert new.free_queue() == ref.free_queue()
    assert new.free_cached_blocks() == ref.free_cached_blocks()
    hash_of = new._hash_of
    held = [hash_of[new._block_id[b]] for b in new.free_cached_blocks()]
    assert held == [ref._free[b] for b in ref.free_cached_blocks()]
    assert new.ref_cnt.tolist() == ref.ref_cnt
    assert new.num_free_blocks == ref.num_free_blocks
    assert new.usage == ref.usage
    assert new.evictions == ref.evictions
    assert new.epoch == ref.epoch
    assert new.num_cached_blocks == ref.num_cached_blocks
    for h in hashes_seen:
        cid = new._idmap.get(h)
        assert (None if cid is None else new.cached_block(cid)) == ref.cached_block(h), h
    assert {hash_of[cid]: blocks for cid, blocks in new._dups.items()} == ref._dups
    assert {hash_of[cid] for cid in new._watched.tolist()} == ref._watch


# A few content chains: chain c's block i has hash c * 1000 + i, so a prefix of a
# chain is what an agent's growing context looks like, and two requests of the
# same chain share (and may duplicate) content.
_CHAINS = 2


@settings(max_examples=400, deadline=None)
@given(
    num_blocks=st.integers(2, 40),
    caching=st.booleans(),
    recycle=st.booleans(),
    ops=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 10**6), st.integers(0, 10**6)),
        max_size=80,
    ),
)
def test_array_pool_matches_the_reference_model(
    num_blocks: int, caching: bool, recycle: bool, ops: list[tuple[int, int, int]]
) -> None:
    # recycle: content ids run out (and are recycled) after a handful of them.
    new = BlockPool(num_blocks, enable_caching=caching, max_ids=4 if recycle else None)
    ref = RefBlockPool(num_blocks, enable_caching=caching)
    live: list[_Request] = []
    seen: set[int] = set()
    for op, x, y in ops:
        if op == 0 or not live:  # a new request: a prefix hit, then fresh blocks
            chain = x % _CHAINS
            length = (y // 2) % 12
            ids = [chain * 1000 + i for i in range(length)]
            seen.update(ids)
            # Odd y: admitted in the same step as another request of the chain,
            # before either cached anything: no hit, the content is duplicated.
            max_hit = 0 if y % 2 else length
            hit_new = new.lookup(_a(new.intern(ids)), max_hit)
            hit_ref = ref.lookup(ids, max_hit)
            assert hit_new.tolist() == hit_ref
            assert new.count_free(hit_new) == ref.count_free(hit_ref)
            # Blocks for the rest of the chain and a partial one (or fewer, if
            # the pool is short: a request the scheduler would not admit).
            want = length - len(hit_ref) + (x // 7) % 2
            fresh = max(0, min(want, new.num_free_blocks - ref.count_free(hit_ref)))
            new.touch(hit_new)
            ref.touch(hit_ref)
            _same(new, ref, seen)
            got_new = new.allocate(fresh)
            got_ref = ref.allocate(fresh)
            assert got_new.tolist() == got_ref
            req = _Request(hit_ref + got_ref, ids[: len(hit_ref)], chain)
            # Cache as far as the chain goes (the scheduler caches full blocks).
            full = min(len(req.blocks), length)
            if full > len(req.ids):
                blocks = req.blocks[len(req.ids) : full]
                more = ids[len(req.ids) : full]
                new.cache_blocks(_a(blocks), _a(new.intern(more)))
                ref.cache_blocks(blocks, more)
                req.ids = ids[:full]
            live.append(req)
        elif op == 1:  # a running request grows by a block and fills the previous
            req = live[x % len(live)]
            if new.num_free_blocks:
                got_new = [new.allocate_one()] if y % 3 else new.allocate(1).tolist()
                got_ref = ref.allocate(1)
                assert got_new == got_ref
                req.blocks += got_ref
            n = len(req.ids)
            if n < len(req.blocks) and y % 2:
                chain = req.chain if req.ids else y % _CHAINS
                req.chain = chain
                h = chain * 1000 + n
                seen.add(h)
                (cid,) = new.intern([h])
                new.cache_block(req.blocks[n], cid)
                ref.cache_block(req.blocks[n], h)
                req.ids.append(h)
        elif op == 2:  # a request finishes (or is preempted): tail first
            req = live.pop(x % len(live))
            new.free_request(_a(req.blocks), len(req.ids))
            ref.free_request(req.blocks, req.ids, len(req.ids))
        elif op == 3:  # the scheduler memoises a blocked admission
            chain = x % _CHAINS
            watched = [chain * 1000 + i for i in range(y % 5)]
            new.watch(_a(new.intern(watched)))
            ref.watch(watched)
        elif op == 4:
            new.unwatch()
            ref.unwatch()
        else:  # a big allocation that runs deep into the cached part of the queue
            n = x % (new.num_free_blocks + 1)
            got_new = new.allocate(n)
            got_ref = ref.allocate(n)
            assert got_new.tolist() == got_ref
            live.append(_Request(got_ref))
        _same(new, ref, seen)
    for req in live:
        new.free_request(_a(req.blocks), len(req.ids))
        ref.free_request(req.blocks, req.ids, len(req.ids))
    _same(new, ref, seen)
    assert new.num_free_blocks == num_blocks - 1


def test_the_cached_part_of_the_queue_compacts_without_losing_order() -> None:
    """Many more frees than the array holds: lazy deletion and compaction keep
    the queue equal to the model's."""
    new = BlockPool(8)
    ref = RefBlockPool(8)
    ids = [100 + i for i in range(7)]  # hashes, for the model
    cids = _a(new.intern(ids))
    blocks = new.allocate(7)
    assert blocks.tolist() == ref.allocate(7)
    new.cache_blocks(blocks, cids)
    ref.cache_blocks(blocks.tolist(), ids)
    for i in range(200):
        # Free all, re-take a prefix hit (pulling blocks out mid-queue), free again.
        new.free_request(blocks, 7)
        ref.free_request(blocks.tolist(), ids, 7)
        k = 1 + i % 7
        hit_new = new.lookup(cids, k)
        hit_ref = ref.lookup(ids, k)
        new.touch(hit_new)
        ref.touch(hit_ref)
        rest_new = new.allocate(7 - k)
        rest_ref = ref.allocate(7 - k)
        assert rest_new.tolist() == rest_ref
        blocks = np.concatenate((hit_new, rest_new))
        new.cache_blocks(blocks[k:], cids[k:])
        ref.cache_blocks(rest_ref, ids[k:])
        _same(new, ref, set(ids))


@pytest.mark.parametrize("spec", ["unlimited", "aimd"])
def test_recycling_content_ids_changes_no_run(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole simulated run with content ids recycled every few hundred gives the
    very summary of a run that never recycles."""
    trace = generate(
        "swe-swarm",
        3,
        agents=10,
        steps=(3, 6),
        first_input_tokens=(2500, 4000),
        shared_prefix_tokens=1024,
        input_tokens=(300, 1500),
        output_tokens=(50, 250),
        tool_latency_median_s=1.0,
    )
    config = EngineSpec(kv_capacity_tokens=40_000, block_size=16).build()

    def run() -> str:
        runner = Runner(trace, EngineModel(config), build_policy(spec), block_size=16)
        return json.dumps(dataclasses.asdict(runner.run().summary), sort_keys=True)

    plain = run()
    recycles = 0

    class SmallIdPool(BlockPool):
        __slots__ = ()

        def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
            super().__init__(num_blocks, block_size, enable_caching, max_ids=num_blocks + 200)

        def _recycle_ids(self) -> None:
            nonlocal recycles
            recycles += 1
            super()._recycle_ids()

    monkeypatch.setattr(scheduler, "BlockPool", SmallIdPool)
    assert run() == plain
    assert recycles > 5
