"""Token sequences, block hashing and the KV block pool (vLLM V1 semantics)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest

from concur.sim.blocks import (
    BlockPool,
    TokenSeq,
    VirtualSegment,
    output_key,
    output_segment,
)

V = VirtualSegment


# -- TokenSeq -----------------------------------------------------------------


def test_length_extend_grow_and_segments() -> None:
    s = TokenSeq([V("sys", 20), (1, 2, 3)], block_size=16)
    assert len(s) == 23
    assert s.num_full_blocks == 1
    s.extend(V("empty", 0), (), V("in", 9))
    assert len(s) == 32
    assert s.segments == (V("sys", 20), (1, 2, 3), V("in", 9))
    s.grow("r:out", 3)
    s.grow("r:out", 2)
    assert len(s) == 37
    assert s.segments[-1] == V("r:out", 5)
    assert len(s.segments) == 4
    with pytest.raises(TypeError, match="segment"):
        s.extend(cast(Any, [1, 2]))
    with pytest.raises(ValueError, match="length"):
        V("x", -1)


def test_output_segment_convention() -> None:
    assert output_key("agent-3#7") == "agent-3#7:out"
    assert output_segment("agent-3#7", 12) == V("agent-3#7:out", 12)


def test_hashes_cover_full_blocks_only_and_are_prefix_stable() -> None:
    s = TokenSeq([V("a", 40)])
    h = list(s.block_hashes())
    assert len(h) == 2  # 40 tokens -> 2 full blocks of 16
    s.extend(V("b", 30))  # 70 tokens -> 4 full blocks
    h2 = list(s.block_hashes())
    assert len(h2) == 4
    assert h2[:2] == h
    assert len(set(h2)) == 4
    with pytest.raises(ValueError, match="not full"):
        s.hashes_upto(5)


def test_same_content_hashes_the_same_however_it_is_segmented() -> None:
    ids = tuple(range(100, 150))
    whole = TokenSeq([ids])
    split = TokenSeq([ids[:5], ids[5:21], ids[21:40], ids[40:]])
    assert list(whole.block_hashes()) == list(split.block_hashes())
    assert len(whole.block_hashes()) == 3
    # A virtual run split at different points: (key, i) names the same tokens.
    grown = TokenSeq([V("ctx", 10)])
    grown.grow("ctx", 38)
    assert list(grown.block_hashes()) == list(TokenSeq([V("ctx", 48)]).block_hashes())


def test_chain_hash_depends_on_everything_before() -> None:
    shared = TokenSeq([V("sys", 32), V("alice", 32)])
    other = TokenSeq([V("sys", 32), V("bob", 32)])
    diff_start = TokenSeq([V("SYS", 32), V("alice", 32)])
    a, b, c = (list(x.block_hashes()) for x in (shared, other, diff_start))
    assert a[:2] == b[:2]  # the shared system prompt
    assert a[2:] != b[2:] and a[2] != b[2] and a[3] != b[3]
    # Same later content, different first block: nothing matches.
    assert not set(a) & set(c)


def test_copy_and_extended_do_not_alias() -> None:
    base = TokenSeq([V("sys", 16), V("in0", 20)])
    h_before = list(base.block_hashes())
    nxt = base.extended(output_segment("r0", 10), V("in1", 5))
    assert len(base) == 36 and len(nxt) == 51
    assert list(base.block_hashes()) == h_before
    assert list(nxt.block_hashes())[:2] == h_before
    cp = base.copy()
    cp.grow("r0:out", 100)
    assert len(base) == 36
    # The request's own output segment and the next prompt's copy of it match.
    eng_side = base.copy()
    eng_side.grow(output_key("r0"), 10)
    eng_side.extend(V("in1", 5))
    assert list(eng_side.block_hashes()) == list(nxt.block_hashes())


def test_explicit_and_virtual_tokens_never_collide() -> None:
    a = TokenSeq([V("k", 16)])
    b = TokenSeq([tuple(range(16))])
    assert list(a.block_hashes()) != list(b.block_hashes())


# -- BlockPool ------------------------------------------------------------------


def _ids(pool: BlockPool, key: str, n: int) -> list[int]:
    """Content ids of the ``n`` full blocks of a fresh virtual sequence."""
    return pool.content_ids(TokenSeq([V(key, 16 * n)]), n)[:n].tolist()


def _a(xs: list[int]) -> np.ndarray:
    return np.asarray(xs, np.int64)


def test_content_ids_are_dense_shared_by_equal_content_and_kept_on_the_sequence() -> None:
    pool = BlockPool(9)
    seq = TokenSeq([V("A", 48)])
    ids = pool.content_ids(seq, 3)[:3].tolist()
    assert ids == [0, 1, 2]
    # Equal content, another object: the same ids; new content: the next ones.
    assert pool.content_ids(TokenSeq([V("A", 32)]), 2)[:2].tolist() == [0, 1]
    assert pool.content_ids(TokenSeq([V("B", 16)]), 1)[:1].tolist() == [3]
    assert pool.intern(list(seq.block_hashes())) == [0, 1, 2]
    # A copy carries the ids; extending it interns only the new block.
    longer = seq.extended(V("A+", 16))
    assert longer._nids == 3
    assert pool.content_ids(longer, 4)[:4].tolist() == [0, 1, 2, 4]
    assert seq._nids == 3  # the original is untouched
    # Another pool has its own ids: the sequence's cached ids are not reused.
    other = BlockPool(9)
    other.content_ids(TokenSeq([V("Z", 16)]), 1)
    assert other.content_ids(seq, 3)[:3].tolist() == [1, 2, 3]


def test_null_block_usage_and_fresh_allocation_order() -> None:
    pool = BlockPool(9)
    assert pool.num_usable_blocks == 8
    assert pool.num_free_blocks == 8
    assert pool.free_queue() == [1, 2, 3, 4, 5, 6, 7, 8]  # block 0 is the null block
    assert pool.usage == 0.0
    got = pool.allocate(3)
    assert got.tolist() == [1, 2, 3]
    assert pool.ref_cnt[1:4].tolist() == [1, 1, 1]
    assert pool.usage == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="only 5 free"):
        pool.allocate(6)


def test_freed_request_goes_tail_first_and_lru_evicts_its_tail_first() -> None:
    """Hand-computed vLLM free-queue order.

    A holds blocks [1, 2, 3] (all cached) and a partial block 4. Freeing in
    reverse order puts the unhashed block 4 at the head (reused first) and the
    hashed ones at the tail as 3, 2, 1: the tail of A's sequence is evicted
    before its head.
    """
    pool = BlockPool(9)
    ha = _a(_ids(pool, "A", 3))
    a = pool.allocate(4)
    assert a.tolist() == [1, 2, 3, 4]
    pool.cache_blocks(a[:3], ha)
    pool.free_request(a, 3)
    assert pool.free_queue() == [4, 5, 6, 7, 8, 3, 2, 1]
    assert pool.free_cached_blocks() == [3, 2, 1]
    assert pool.usage == 0.0  # free cached blocks count as free
    assert pool.num_cached_blocks == 3
    assert pool.lookup(ha, 3).tolist() == [1, 2, 3]

    # Five blocks come from the head without touching A's cached blocks...
    b = pool.allocate(5)
    assert b.tolist() == [4, 5, 6, 7, 8]
    assert pool.evictions == 0
    # ...the sixth reuses A's last block and evicts its content.
    c = pool.allocate(1)
    assert c.tolist() == [3]
    assert pool.evictions == 1
    assert pool.cached_block(int(ha[2])) is None
    assert pool.lookup(ha, 3).tolist() == [1, 2]
    assert pool.free_queue() == [2, 1]


def test_touch_pulls_free_cached_blocks_and_counts_references() -> None:
    pool = BlockPool(9)
    ha = _a(_ids(pool, "A", 3))
    a = pool.allocate(3)
    pool.cache_blocks(a, ha)
    pool.free_request(a, 3)
    hit = pool.lookup(ha, 2)  # e.g. the last token's block is never a hit
    assert hit.tolist() == [1, 2]
    assert pool.count_free(hit) == 2
    pool.touch(hit)
    assert pool.ref_cnt[1] == 1 and pool.ref_cnt[2] == 1
    assert pool.free_queue() == [4, 5, 6, 7, 8, 3]
    # A second request shares block 1.
    pool.touch(_a([1]))
    assert pool.ref_cnt[1] == 2
    assert pool.count_free(_a([1, 2, 3])) == 1
    # Dropping one reference keeps it in use; dropping the last frees it.
    pool.free_request(_a([1]), 1)
    assert pool.ref_cnt[1] == 1
    assert 1 not in pool.free_queue()
    pool.free_request(_a([1, 2]), 2)
    assert pool.free_queue() == [4, 5, 6, 7, 8, 3, 2, 1]
    with pytest.raises(ValueError, match="block 1 freed more often"):
        pool.free_blocks([1])
    assert pool.free_queue() == [4, 5, 6, 7, 8, 3, 2, 1]  # the bad call changed nothing


def test_touching_a_free_unfilled_block_takes_it_off_the_front() -> None:
    pool = BlockPool(6)
    pool.touch(_a([2, 4]))
    assert pool.free_queue() == [1, 3, 5]
    assert pool.num_free_blocks == 3
    assert pool.allocate(3).tolist() == [1, 3, 5]


def test_lookup_stops_at_first_miss_and_respects_max_blocks() -> None:
    pool = BlockPool(20)
    h = _a(_ids(pool, "X", 5))
    blocks = pool.allocate(5)
    pool.cache_blocks(blocks, h)
    assert pool.lookup(h, 5).tolist() == blocks.tolist()
    assert pool.lookup(h, 3).tolist() == blocks[:3].tolist()
    assert pool.lookup(h, 0).tolist() == []
    other = _a(_ids(pool, "Y", 5))
    assert pool.lookup(other, 5).tolist() == []
    # A hole in the chain ends the hit even if later blocks are cached.
    pool.free_request(blocks, 5)  # tail first: 5, 4, 3, 2, 1 at the tail
    pool.allocate(len(pool.free_queue()) - 5 + 1)  # evicts block 5 (hash h[4])
    assert pool.lookup(h, 5).tolist() == blocks[:4].tolist()


def test_lookup_of_a_long_sequence_crosses_chunks() -> None:
    pool = BlockPool(3000)
    h = _a(_ids(pool, "L", 2500))
    blocks = pool.allocate(2500)
    pool.cache_blocks(blocks, h)
    assert pool.lookup(h, 2500).tolist() == blocks.tolist()
    # Evict one block in the middle (block 1700's content): the hit ends there.
    pool.free_request(blocks[1700:1701], 1)
    pool.allocate(pool.num_free_blocks)
    assert pool.lookup(h, 2500).tolist() == blocks[:1700].tolist()


def test_duplicate_content_keeps_oldest_and_promotes_on_eviction() -> None:
    pool = BlockPool(6)
    h = _a(_ids(pool, "dup", 1))
    first = pool.allocate(1)
    second = pool.allocate(1)
    pool.cache_blocks(first, h)
    pool.cache_blocks(second, h)
    assert pool.num_cached_blocks == 2
    assert pool.cached_block(int(h[0])) == first[0]
    pool.free_request(first, 1)
    # Free queue: 3, 4, 5, then first (cached). Evict it: the copy takes over.
    assert pool.allocate(4)[-1] == first[0]
    assert pool.cached_block(int(h[0])) == second[0]
    assert pool.num_cached_blocks == 1


def test_unhashed_blocks_are_reused_first_lifo() -> None:
    pool = BlockPool(9)
    a = pool.allocate(2)  # [1, 2], never filled
    b = pool.allocate(2)  # [3, 4], never filled
    pool.free_request(a, 0)
    pool.free_request(b, 0)
    # Each request's blocks go to the front tail-first; the later free lands first.
    assert pool.free_queue()[:4] == [4, 3, 2, 1]


def test_disabled_caching_never_caches() -> None:
    pool = BlockPool(5, enable_caching=False)
    h = _a(_ids(pool, "A", 2))
    a = pool.allocate(2)
    pool.cache_blocks(a, h)
    assert pool.num_cached_blocks == 0
    assert pool.lookup(h, 2).tolist() == []
    pool.free_request(a, 2)
    assert pool.free_queue() == [2, 1, 3, 4]


def test_epoch_moves_only_when_a_hit_could_grow() -> None:
    pool = BlockPool(9)
    h = _a(_ids(pool, "W", 3))
    a = pool.allocate(3)
    e0 = pool.epoch
    pool.watch(h[:2])
    assert pool.watching() and pool.watched(int(h[0])) and not pool.watched(int(h[2]))
    pool.cache_blocks(a[2:], h[2:])  # not watched
    assert pool.epoch == e0
    pool.cache_blocks(a[:2], h[:2])  # watched
    assert pool.epoch == e0 + 1
    pool.free_request(a, 3)
    assert pool.epoch == e0 + 1  # frees never bump it
    pool.touch(a[:1])  # pulled out of the free queue
    assert pool.epoch == e0 + 2
    pool.unwatch()


def test_intern_numbers_new_hashes_in_order_of_first_sight() -> None:
    pool = BlockPool(4)
    assert pool.intern([10, 11, 12]) == [0, 1, 2]
    assert pool.intern([11, 13, 14]) == [1, 3, 4]  # a known head, a new tail
    assert pool.intern([15, 10, 16, 15, 16]) == [5, 0, 6, 5, 6]  # mixed, repeats
    assert pool.intern([]) == []
    # Ids beyond the initial arrays grow them.
    many = pool.intern(range(100, 5000))
    assert many == list(range(7, 4907))
    assert pool.cached_block(4906) is None
