"""The OrderedDict block pool that ``concur.sim.blocks.BlockPool`` replaced.

Kept only as the reference model for ``tests/sim/test_block_pool_model.py``: it
mirrors vLLM's ``FreeKVCacheBlockQueue`` one Python object per block, which is
easy to read and check against vLLM, and the array-backed pool must agree with
it operation by operation. It is keyed by block hash, the array pool by the
content id it interns for that hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import repeat

_LOOKUP_CHUNK = 64


class RefBlockPool:
    """The KV block pool of one engine: reference counts, cached-block map and
    the free queue (head = next to be reused). Blocks are plain ints.

    A block's hash is not stored on the block: a free block carries it as its
    free-queue entry, and a block in use is hashed exactly when it lies among
    the first ``num_hashed`` blocks of every request holding it, whose sequence
    knows the hash. So requests free their blocks with :meth:`free_request`,
    passing their hashes. (This saves two list operations per block on the
    paths that thrashing runs millions of times.)

    Args:
        num_blocks: blocks in the pool, the null block included (vLLM's
            ``num_gpu_blocks``).
        block_size: tokens per block.
        enable_caching: prefix caching (vLLM's ``enable_prefix_caching``).
    """

    __slots__ = (
        "_cached",
        "_dups",
        "_free",
        "_watch",
        "block_size",
        "enable_caching",
        "epoch",
        "evictions",
        "num_blocks",
        "ref_cnt",
    )

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_cnt: list[int] = [0] * num_blocks
        # hash -> oldest block cached under it; younger duplicates in _dups.
        self._cached: dict[int, int] = {}
        self._dups: dict[int, list[int]] = {}
        # Free queue in eviction order: block -> its hash (None if unhashed).
        # Block 0 is the null block: never free, never handed out.
        self._free: OrderedDict[int, int | None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.evictions = 0
        """Cached blocks whose hash was dropped because the block was reused."""
        self._watch: set[int] = set()
        self.epoch = 0
        """Bumped whenever a lookup could have found *more* in-use hit blocks than
        before: a free block was pulled out of the queue by ``touch``, or a
        watched hash (see :meth:`watch`) was cached. Evictions and frees never
        bump it: they can only shorten a hit or hand its blocks back."""

    # -- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue, free cached (evictable) blocks included."""
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """vLLM's ``get_usage``: the fraction of usable blocks not free."""
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently findable by hash (in use or free)."""
        return len(self._cached) + sum(len(d) for d in self._dups.values())

    def free_queue(self) -> list[int]:
        """The free queue, head (next to be reused) first."""
        return list(self._free)

    def free_cached_blocks(self) -> list[int]:
        """Free blocks that still hold cached content (evictable), head first."""
        return [b for b, h in self._free.items() if h is not None]

    def cached_block(self, block_hash: int) -> int | None:
        """The block a lookup of ``block_hash`` would return, if any."""
        return self._cached.get(block_hash)

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """The longest run of cached blocks matching ``hashes[:max_blocks]``
        from the start (vLLM's ``find_longest_cache_hit``). No side effects."""
        if not self.enable_caching or max_blocks <= 0:
            return []
        # Look hashes up a chunk at a time (doubling), cutting at the first miss:
        # plain ``map`` over a slice is cheaper per block than a ``takewhile``,
        # and doubling wastes at most one chunk past a miss.
        get = self._cached.get
        hit: list[int] = []
        start = 0
        size = _LOOKUP_CHUNK
        while start < max_blocks:
            end = min(start + size, max_blocks)
            found: list[int | None] = list(map(get, hashes[start:end]))
            if None in found:
                del found[found.index(None) :]
                hit.extend(found)  # type: ignore[arg-type]  # no None left
                return hit
            hit.extend(found)  # type: ignore[arg-type]  # no None in it
            start = end
            size += size
        return hit

    def count_free(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` sit in the free queue (reference count 0)."""
        ref = self.ref_cnt
        return [ref[b] for b in blocks].count(0)

    def watch(self, hashes: Iterable[int]) -> None:
        """Bump :attr:`epoch` when any of ``hashes`` is cached (replaces the
        previous watch set). Used to memoise a blocked admission check."""
        self._watch = set(hashes)

    def unwatch(self) -> None:
        self._watch = set()

    # -- mutations -----------------------------------------------------------

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on hit blocks, pulling free ones out of the queue."""
        ref = self.ref_cnt
        free = self._free
        pulled = False
        for b in blocks:
            r = ref[b]
            if not r:
                del free[b]
                pulled = True
            ref[b] = r + 1
        if pulled:
            self.epoch += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Pop ``num_blocks`` blocks from the head of the free queue, evicting
        the cached content of any popped block (vLLM's ``get_new_blocks``)."""
        free = self._free
        if num_blocks > len(free):
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {len(free)} free")
        pop = free.popitem
        ref = self.ref_cnt
        cached = self._cached
        dups = self._dups
        out: list[int] = []
        append = out.append
        evicted = 0
        # One plain loop: measured faster than list comprehensions here, as
        # each popped (block, hash) tuple is released at once.
        for _ in repeat(None, num_blocks):
            b, h = pop(False)
            ref[b] = 1
            append(b)
            if h is not None:
                if dups and h in dups:
                    self._evict_dup(b, h)
                else:
                    del cached[h]
                evicted += 1
        self.evictions += evicted
        return out

    def _evict_dup(self, block: int, block_hash: int) -> None:
        """Drop ``block`` from the cache entry of a hash with several copies."""
        cached = self._cached
        dups = self._dups[block_hash]
        if cached[block_hash] == block:
            cached[block_hash] = dups.pop(0)
        else:
            dups.remove(block)
        if not dups:
            del self._dups[block_hash]

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """Record that ``blocks[i]`` (now full) holds content ``hashes[i]``."""
        if not self.enable_caching:
            return
        if len(blocks) != len(hashes):
            raise ValueError(f"{len(blocks)} blocks but {len(hashes)} hashes")
        if self._watch and not self._watch.isdisjoint(hashes):
            self.epoch += 1
        # setdefault keeps the oldest block as the entry; younger copies of the
        # same content (computed concurrently) are kept as duplicates.
        prev = list(map(self._cached.setdefault, hashes, blocks))
        if prev != list(blocks):
            for b, h, p in zip(blocks, hashes, prev, strict=True):
                if p != b:
                    self._dups.setdefault(h, []).append(b)

    def cache_block(self, block: int, block_hash: int) -> None:
        """``cache_blocks([block], [block_hash])``, for one block at a time."""
        if not self.enable_caching:
            return
        if block_hash in self._watch:
            self.epoch += 1
        prev = self._cached.setdefault(block_hash, block)
        if prev != block:
            self._dups.setdefault(block_hash, []).append(block)

    def free_blocks(self, ordered: Iterable[tuple[int, int | None]]) -> None:
        """Drop one reference from each ``(block, hash or None)``, given in
        eviction-priority order (first = evicted first), as vLLM's
        ``BlockPool.free_blocks``: blocks reaching zero references go to the
        free queue, unhashed ones to the front (in order), hashed ones to the
        tail (in order). Requests use :meth:`free_request`.
        """
        ref = self.ref_cnt
        free = self._free
        caching = self.enable_caching
        front: list[int] = []
        for b, h in ordered:
            r = ref[b] - 1
            if r < 0:
                raise ValueError(f"block {b} freed more often than referenced")
            ref[b] = r
            if not r:
                if caching and h is not None:
                    free[b] = h
                else:
                    front.append(b)
        self._prepend(front)

    def free_request(self, blocks: Sequence[int], hashes: Sequence[int], num_hashed: int) -> None:
        """Free a request's blocks (in allocation order; the first
        ``num_hashed`` hold ``hashes[:num_hashed]``) the way vLLM's manager does:
        in reverse, so the tail of its sequence is evicted first."""
        if not self.enable_caching:
            num_hashed = 0
        ref = self.ref_cnt
        free = self._free
        front: list[int] = []
        # Reversed order visits the unhashed tail first; those go to the front.
        for b in reversed(blocks[num_hashed:]):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                front.append(b)
        for b, h in zip(reversed(blocks[:num_hashed]), reversed(hashes[:num_hashed]), strict=True):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                free[b] = h
        self._prepend(front)

    def _prepend(self, front: list[int]) -> None:
        """Put ``front`` at the head of the free queue, ``front[0]`` first."""
        if front:
            free = self._free
            move = free.move_to_end
            for b in reversed(front):
                free[b] = None
                move(b, False)
