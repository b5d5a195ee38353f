"""Paged KV blocks with prefix caching, as vLLM V1 manages them.

Mirrors ``vllm/v1/core/block_pool.py``, ``kv_cache_utils.py`` (the
``FreeKVCacheBlockQueue``) and ``single_type_kv_cache_manager.py`` of vLLM 0.32:

- Block 0 is the *null block*: vLLM pops it from the free queue at start-up and
  never hands it out, so ``num_blocks - 1`` blocks are usable and usage is
  ``1 - free / (num_blocks - 1)`` (``BlockPool.get_usage``).
- Full blocks are cached under a chain hash (parent hash, block content). A
  cached block keeps its hash after its last reference is dropped and stays
  findable until the block is handed out again (evicted) by an allocation.
- The free queue is in eviction order: allocation pops from the head, and a
  popped block that still carries a hash is evicted from the cache then.
  ``free_blocks`` takes blocks in eviction-priority order (the request's blocks
  reversed, so a sequence's tail blocks are evicted first); blocks without a
  hash go to the *front* (reused first, LIFO), hashed ones to the *tail* (LRU).
- A prefix hit on a free cached block removes it from the free queue
  (``touch``); free cached blocks count as free for usage.
- Hashes are not de-duplicated: two requests that compute the same block each
  cache their own copy; a lookup returns the oldest one.

Token content is held as *segments* so that hashing costs O(blocks), not
O(tokens): a segment is either explicit token ids (``tuple[int, ...]``) or a
:class:`VirtualSegment` ``(key, length)`` whose i-th token is ``(key, i)``.
A block's content is the list of segment pieces covering its positions, with
adjacent explicit pieces merged so that the same token ids hash the same however
they were split into segments.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TypeAlias

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockPool",
    "Prompt",
    "Segment",
    "TokenSeq",
    "VirtualSegment",
    "output_key",
    "output_segment",
]

DEFAULT_BLOCK_SIZE = 16
"""vLLM's default KV block size on CUDA."""

_ROOT_HASH = 0x5EED_C0C0_CAFE
"""Parent hash of a sequence's first block (vLLM's ``NONE_HASH``)."""

_LOOKUP_CHUNK = 64
"""Blocks looked up at once by :meth:`BlockPool.lookup` before doubling."""


@dataclass(frozen=True, slots=True)
class VirtualSegment:
    """``length`` tokens named ``(key, 0) .. (key, length - 1)``.

    Two sequences that contain virtual segments with the same key share those
    tokens (for as many positions as both have), so they share cache blocks
    wherever the surrounding positions line up too.
    """

    key: str
    length: int

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"VirtualSegment {self.key!r}: length must be >= 0, got {self.length}")


Segment: TypeAlias = tuple[int, ...] | VirtualSegment
"""Explicit token ids, or a virtual run of tokens."""


def output_key(request_id: str) -> str:
    """Key of the virtual segment holding a request's output tokens.

    The engine appends each request's generated tokens to its sequence as
    ``VirtualSegment(output_key(request_id), n)``. An agent's next request must
    carry its previous prompt's segments followed by exactly that segment (see
    :func:`output_segment`) for its previous context to hit the prefix cache.
    """
    return f"{request_id}:out"


def output_segment(request_id: str, num_tokens: int) -> VirtualSegment:
    """The segment standing for the first ``num_tokens`` outputs of ``request_id``."""
    return VirtualSegment(output_key(request_id), num_tokens)


def _seg_len(segment: Segment) -> int:
    return segment.length if isinstance(segment, VirtualSegment) else len(segment)


class TokenSeq:
    """A token sequence made of segments, with incremental block hashes.

    ``block_hashes()`` returns the chain hashes of all *full* blocks and is
    cached: hashes are computed once per block, when asked for after the block
    has filled. Appending never changes earlier hashes. ``copy`` and
    ``extended`` share nothing mutable with the original but carry its hashes
    over, so an agent's growing context is hashed once overall.

    Block hashes are Python ``hash`` values of ``(parent_hash, content)``: equal
    contents give equal hashes within a process, which is all the cache needs.
    """

    __slots__ = ("_block_size", "_cur_off", "_cur_seg", "_hashes", "_len", "_lens", "_segs")

    def __init__(
        self, segments: Iterable[Segment] = (), block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._block_size = block_size
        self._segs: list[Segment] = []
        # Lengths live apart from the segments so that growing the trailing
        # virtual segment (one output token at a time) costs an int update.
        self._lens: list[int] = []
        self._len = 0
        self._hashes: list[int] = []
        self._cur_seg = 0  # where the first unhashed block starts
        self._cur_off = 0
        self.extend(*segments)

    @classmethod
    def virtual(cls, key: str, length: int, block_size: int = DEFAULT_BLOCK_SIZE) -> TokenSeq:
        """A sequence of one virtual segment."""
        return cls((VirtualSegment(key, length),), block_size)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        parts = [
            f"{s.key!r}x{n}" if isinstance(s, VirtualSegment) else f"ids[{n}]"
            for s, n in zip(self._segs, self._lens, strict=True)
        ]
        return f"TokenSeq({', '.join(parts)}; {self._len} tokens)"

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The segments, in order (virtual ones with their current length)."""
        out: list[Segment] = []
        for seg, n in zip(self._segs, self._lens, strict=True):
            if isinstance(seg, VirtualSegment) and seg.length != n:
                seg = VirtualSegment(seg.key, n)
            out.append(seg)
        return tuple(out)

    @property
    def num_full_blocks(self) -> int:
        return self._len // self._block_size

    def extend(self, *segments: Segment) -> TokenSeq:
        """Append segments in place (empty ones are skipped); returns ``self``."""
        for seg in segments:
            if isinstance(seg, VirtualSegment):
                n = seg.length
            elif isinstance(seg, tuple):
                n = len(seg)
            else:
                raise TypeError(
                    "a segment is a tuple of token ids or a VirtualSegment, "
                    f"got {type(seg).__name__}"
                )
            if n == 0:
                continue
            self._segs.append(seg)
            self._lens.append(n)
            self._len += n
        return self

    def grow(self, key: str, num_tokens: int) -> None:
        """Lengthen the trailing virtual segment ``key`` by ``num_tokens`` tokens,
        or append ``VirtualSegment(key, num_tokens)`` if the sequence does not
        end with that key."""
        if num_tokens <= 0:
            if num_tokens < 0:
                raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
            return
        segs = self._segs
        if segs:
            last = segs[-1]
            if isinstance(last, VirtualSegment) and last.key == key:
                self._lens[-1] += num_tokens
                self._len += num_tokens
                return
        segs.append(VirtualSegment(key, num_tokens))
        self._lens.append(num_tokens)
        self._len += num_tokens

    def copy(self) -> TokenSeq:
        new = TokenSeq.__new__(TokenSeq)
        new._block_size = self._block_size
        new._segs = self._segs.copy()
        new._lens = self._lens.copy()
        new._len = self._len
        new._hashes = self._hashes.copy()
        new._cur_seg = self._cur_seg
        new._cur_off = self._cur_off
        return new

    def extended(self, *segments: Segment) -> TokenSeq:
        """A copy with ``segments`` appended."""
        return self.copy().extend(*segments)

    def block_hashes(self) -> Sequence[int]:
        """Chain hashes of every full block (do not mutate the result)."""
        return self.hashes_upto(self._len // self._block_size)

    def hashes_upto(self, num_blocks: int) -> list[int]:
        """At least the first ``num_blocks`` block hashes (all must be full).

        Returns the internal list, which may hold more; do not mutate it.
        """
        hashes = self._hashes
        if len(hashes) >= num_blocks:
            return hashes
        bs = self._block_size
        if num_blocks * bs > self._len:
            raise ValueError(
                f"block {num_blocks - 1} is not full: the sequence has {self._len} tokens"
            )
        segs = self._segs
        lens = self._lens
        si = self._cur_seg
        off = self._cur_off
        parent = hashes[-1] if hashes else _ROOT_HASH
        append = hashes.append
        while len(hashes) < num_blocks:
            seglen = lens[si]
            if off == seglen:
                si += 1
                off = 0
                continue
            seg = segs[si]
            avail = seglen - off
            if avail >= bs:
                # Fast path: whole blocks inside one segment.
                k = min(avail // bs, num_blocks - len(hashes))
                if isinstance(seg, VirtualSegment):
                    key = seg.key
                    for _ in range(k):
                        end = off + bs
                        parent = hash((parent, ((key, off, end),)))
                        append(parent)
                        off = end
                else:
                    for _ in range(k):
                        end = off + bs
                        parent = hash((parent, (seg[off:end],)))
                        append(parent)
                        off = end
                continue
            # A block spanning several segments.
            pieces: list[object] = []
            last_explicit = False
            need = bs
            while need:
                seglen = lens[si]
                if off == seglen:
                    si += 1
                    off = 0
                    continue
                seg = segs[si]
                take = min(need, seglen - off)
                if isinstance(seg, VirtualSegment):
                    pieces.append((seg.key, off, off + take))
                    last_explicit = False
                else:
                    piece = seg[off : off + take]
                    if last_explicit:
                        prev = pieces[-1]
                        assert isinstance(prev, tuple)
                        pieces[-1] = prev + piece
                    else:
                        pieces.append(piece)
                    last_explicit = True
                off += take
                need -= take
            parent = hash((parent, tuple(pieces)))
            append(parent)
        self._cur_seg = si
        self._cur_off = off
        return hashes


Prompt = TokenSeq
"""A prompt is a token sequence."""


class BlockPool:
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

    def __init__(
        self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, enable_caching: bool = True
    ) -> None:
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
