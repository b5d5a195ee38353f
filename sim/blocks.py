"""Paged KV blocks with prefix caching, as vLLM V1 manages them.

Mirrors ``vllm/v1/core/block_pool.py``, ``kv_cache_utils.py`` (the
``FreeKVCacheBlockQueue``) and ``single_type_kv_cache_manager.py`` of vLLM 0.32:

- Block 0 is the *null block*: vLLM pops it from the free queue at start-up and
  never hands it out, so ``num_blocks - 1`` blocks are usable and usage is
  ``1 - free / (num_blocks - 1)`` (``BlockPool.get_usage``).
- Full blocks are cached under a chain hash (parent hash, block content). A
  cached block keeps its hash after its last reference is dropped and stays
  findable until the block is handed out again (evicted) by an allocation.
  The pool names each distinct hash by a dense *content id* and keeps its
  state in arrays indexed by block and by content id (see :class:`BlockPool`).
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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "EMPTY_BLOCKS",
    "BlockArray",
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

_LOOKUP_CHUNK = 256
"""Blocks looked up at once by :meth:`BlockPool.lookup` before doubling."""


BlockArray: TypeAlias = "NDArray[np.int64]"
"""Block numbers (or content ids) as a 1-D int64 array."""

EMPTY_BLOCKS: BlockArray = np.zeros(0, np.int64)
"""An empty, read-only block (or content id) array."""
EMPTY_BLOCKS.flags.writeable = False


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

    __slots__ = (
        "_block_size",
        "_cur_off",
        "_cur_seg",
        "_hashes",
        "_id_owner",
        "_ids",
        "_len",
        "_lens",
        "_nids",
        "_segs",
    )

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
        # Content ids of the first _nids blocks, from the pool whose id map is
        # _id_owner (see BlockPool.content_ids).
        self._ids: BlockArray = EMPTY_BLOCKS
        self._nids = 0
        self._id_owner: object = None
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
        n = self._nids
        new._ids = self._ids[:n].copy() if n else EMPTY_BLOCKS
        new._nids = n
        new._id_owner = self._id_owner
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
    the free queue (head = next to be reused), held in arrays.

    Blocks are ints ``0 .. num_blocks - 1``. Cached content is named by dense
    *content ids* that the pool hands out for block hashes (:meth:`intern`,
    :meth:`content_ids`), so that the cache is an array indexed by content id
    and every operation on a request's blocks is a handful of array operations,
    not a Python loop over thousands of blocks: the simulator runs millions of
    block allocations, and per-block Python objects were most of its time.

    The free queue is vLLM's single list, held in two parts that never
    interleave: blocks without content (never filled, or freed unfilled) sit on
    a stack at the head, so the most recently freed is reused first, and blocks
    with cached content follow in LRU order, in an append-only array with lazy
    deletion (a block is in it at index ``i`` iff ``qpos[block] == i``; a
    prefix hit that pulls a free cached block out just clears ``qpos``).
    Unfilled blocks never gain content while free, and cached ones lose it only
    when handed out, so this is exactly vLLM's order (checked operation by
    operation against a one-object-per-block model in
    ``tests/sim/test_block_pool_model.py``).

    Content ids are recycled: once ``max_ids`` have been handed out, the ids of
    content no longer cached are dropped and the rest renumbered, so a pool that
    runs for ever (``concur engine``) holds ids for at most ``max_ids`` hashes,
    not for every block it ever saw.

    Args:
        num_blocks: blocks in the pool, the null block included (vLLM's
            ``num_gpu_blocks``).
        block_size: tokens per block.
        enable_caching: prefix caching (vLLM's ``enable_prefix_caching``).
        max_ids: content ids to hand out before recycling them (default: 64 per
            block, at least 2**20; below the number of blocks it recycles often).
    """

    __slots__ = (
        "_arange",
        "_block_id",
        "_cached",
        "_dups",
        "_front",
        "_has_dup",
        "_hash_of",
        "_head",
        "_idmap",
        "_max_ids",
        "_nmain",
        "_q",
        "_qpos",
        "_tail",
        "_top",
        "_watch_mask",
        "_watched",
        "block_size",
        "enable_caching",
        "epoch",
        "evictions",
        "num_blocks",
        "num_free",
        "ref_cnt",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_caching: bool = True,
        max_ids: int | None = None,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_ids is not None and max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        self._max_ids = max(1 << 20, 64 * num_blocks) if max_ids is None else max_ids
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_cnt: BlockArray = np.zeros(num_blocks, np.int64)
        """References per block (a free block has none)."""
        # Content id held by each block, -1 for none.
        self._block_id: BlockArray = np.full(num_blocks, -1, np.int64)
        # Unfilled free blocks: a stack whose top (``_front[_top - 1]``) is the
        # head of the free queue. Block 0 is the null block: never free.
        self._front: BlockArray = np.zeros(num_blocks, np.int64)
        self._front[: num_blocks - 1] = np.arange(num_blocks - 1, 0, -1)
        self._top = num_blocks - 1
        # Free blocks with cached content, LRU first, in _q[_head:_tail] with
        # stale entries (see the class docstring); compacted when full.
        cap = 4 * num_blocks
        self._q: BlockArray = np.zeros(cap, np.int64)
        self._qpos: BlockArray = np.full(num_blocks, -1, np.int64)
        self._arange: BlockArray = np.arange(cap, dtype=np.int64)
        self._head = 0
        self._tail = 0
        self._nmain = 0
        self.num_free = num_blocks - 1
        """Blocks in the free queue, free cached (evictable) blocks included."""
        # Content ids: hash -> id, and per id the oldest block cached under it
        # (-1: none); younger copies of the same content in _dups.
        self._idmap: dict[int, int] = {}
        self._hash_of: list[int] = []  # id -> hash
        ids = max(1024, 2 * num_blocks)
        self._cached: BlockArray = np.full(ids, -1, np.int64)
        self._has_dup = np.zeros(ids, np.bool_)
        self._dups: dict[int, list[int]] = {}
        self._watch_mask = np.zeros(ids, np.bool_)
        self._watched: BlockArray = EMPTY_BLOCKS
        self.evictions = 0
        """Cached blocks whose content was dropped because the block was reused."""
        self.epoch = 0
        """Bumped whenever a lookup could have found *more* in-use hit blocks than
        before: a free block was pulled out of the queue by ``touch``, or a
        watched content id (see :meth:`watch`) was cached. Evictions and frees
        never bump it: they can only shorten a hit or hand its blocks back."""

    # -- content ids ---------------------------------------------------------

    def intern(self, hashes: Iterable[int]) -> list[int]:
        """Content ids of block hashes: equal hashes get equal ids, ids are
        dense (``0, 1, 2, ...`` in order of first sight). Ids taken before a
        call are void after it if it recycled them (see the class docstring);
        :meth:`content_ids` keeps a sequence's ids in step."""
        if len(self._idmap) >= self._max_ids:
            self._recycle_ids()
        return self._intern(hashes)

    def _intern(self, hashes: Iterable[int]) -> list[int]:
        idmap = self._idmap
        hashes = list(hashes)
        ids = list(map(idmap.get, hashes))
        if None not in ids:
            return ids  # type: ignore[return-value]  # no None in it
        first = ids.index(None)
        size = len(idmap)
        tail = dict(zip(hashes[first:], range(size, size + len(hashes) - first), strict=True))
        if ids.count(None) == len(tail) == len(hashes) - first:
            # The usual case: all new from ``first`` on (a sequence's new tail).
            idmap.update(tail)
            ids[first:] = tail.values()
            self._hash_of.extend(tail)
        else:
            for i in range(first, len(hashes)):
                if ids[i] is None:
                    h = hashes[i]
                    cid = idmap.get(h)
                    ids[i] = self._new_id(h) if cid is None else cid
        self._reserve_ids(len(idmap))
        return ids  # type: ignore[return-value]  # no None left

    def content_ids(self, seq: TokenSeq, num_blocks: int) -> BlockArray:
        """Content ids of ``seq``'s first ``num_blocks`` blocks (all full).

        Kept on ``seq`` (and carried by its copies), so a context extended step
        after step is interned once overall. Returns at least ``num_blocks``
        ids; read only the first ``num_blocks``, and do not mutate them."""
        if len(self._idmap) >= self._max_ids:
            self._recycle_ids()  # a new id map: every sequence re-interns
        if seq._id_owner is not self._idmap:
            seq._id_owner = self._idmap
            seq._ids = EMPTY_BLOCKS
            seq._nids = 0
        have = seq._nids
        buf = seq._ids
        if have >= num_blocks:
            return buf
        if num_blocks == have + 1 and have < len(buf):
            # One more block (a decoding request filling its next block).
            h = seq.hashes_upto(num_blocks)[have]
            cid = self._idmap.get(h)
            buf[have] = self._new_id(h) if cid is None else cid
            seq._nids = num_blocks
            return buf
        new = self._intern(seq.hashes_upto(num_blocks)[have:num_blocks])
        if len(buf) < num_blocks:
            grown = np.empty(max(num_blocks, 2 * len(buf), 64), np.int64)
            grown[:have] = buf[:have]
            seq._ids = buf = grown
        buf[have:num_blocks] = new
        seq._nids = num_blocks
        return buf

    def _new_id(self, block_hash: int) -> int:
        """Hand out the next id, for a hash not in the id map."""
        cid = self._idmap[block_hash] = len(self._idmap)
        self._hash_of.append(block_hash)
        self._reserve_ids(cid + 1)
        return cid

    def _recycle_ids(self) -> None:
        """Drop the ids of content that is neither cached nor watched and
        renumber the rest densely, in a new id map (sequences notice the new
        map and re-intern). Changes no behaviour: blocks, queue and hits stay."""
        keep = self._cached[: len(self._hash_of)] >= 0
        if len(self._watched):
            keep[self._watched] = True
        old = np.flatnonzero(keep)
        n = len(old)
        remap = np.full(len(self._cached), -1, np.int64)
        remap[old] = np.arange(n, dtype=np.int64)
        hash_of = self._hash_of
        self._hash_of = [hash_of[i] for i in old.tolist()]
        self._idmap = dict(zip(self._hash_of, range(n), strict=True))
        size = len(self._cached)
        cached = np.full(size, -1, np.int64)
        cached[:n] = self._cached[old]
        has_dup = np.zeros(size, np.bool_)
        has_dup[:n] = self._has_dup[old]
        self._cached = cached
        self._has_dup = has_dup
        self._dups = {int(remap[cid]): blocks for cid, blocks in self._dups.items()}
        held = self._block_id >= 0
        self._block_id[held] = remap[self._block_id[held]]
        self._watch_mask = np.zeros(size, np.bool_)
        if len(self._watched):
            self._watched = remap[self._watched]
            self._watch_mask[self._watched] = True

    def _reserve_ids(self, num_ids: int) -> None:
        """Grow the per-content-id arrays to hold ids ``< num_ids``."""
        size = len(self._cached)
        if num_ids <= size:
            return
        while size < num_ids:
            size *= 2
        extra = size - len(self._cached)
        self._cached = np.concatenate((self._cached, np.full(extra, -1, np.int64)))
        self._has_dup = np.concatenate((self._has_dup, np.zeros(extra, np.bool_)))
        self._watch_mask = np.concatenate((self._watch_mask, np.zeros(extra, np.bool_)))

    # -- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue, free cached (evictable) blocks included."""
        return self.num_free

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """vLLM's ``get_usage``: the fraction of usable blocks not free."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently findable by content (in use or free)."""
        return int(np.count_nonzero(self._cached >= 0)) + sum(map(len, self._dups.values()))

    def free_queue(self) -> list[int]:
        """The free queue, head (next to be reused) first."""
        front: list[int] = self._front[: self._top][::-1].tolist()
        return front + self.free_cached_blocks()

    def free_cached_blocks(self) -> list[int]:
        """Free blocks that still hold cached content (evictable), head first."""
        seg = self._q[self._head : self._tail]
        live: list[int] = seg[self._qpos[seg] == self._arange[self._head : self._tail]].tolist()
        return live

    def cached_block(self, content_id: int) -> int | None:
        """The block a lookup of ``content_id`` would return, if any."""
        if content_id >= len(self._cached):
            return None
        b = int(self._cached[content_id])
        return b if b >= 0 else None

    def lookup(self, ids: BlockArray, max_blocks: int) -> BlockArray:
        """The longest run of cached blocks matching ``ids[:max_blocks]`` from
        the start (vLLM's ``find_longest_cache_hit``). No side effects."""
        if not self.enable_caching or max_blocks <= 0:
            return EMPTY_BLOCKS
        # A chunk at a time (doubling), stopping at the first miss.
        cached = self._cached
        parts: list[BlockArray] = []
        start = 0
        size = _LOOKUP_CHUNK
        while start < max_blocks:
            end = min(start + size, max_blocks)
            found = cached[ids[start:end]]
            miss = found < 0
            if miss.any():
                parts.append(found[: int(miss.argmax())])
                break
            parts.append(found)
            start = end
            size += size
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def count_free(self, blocks: BlockArray) -> int:
        """How many of ``blocks`` sit in the free queue (reference count 0)."""
        return len(blocks) - int(np.count_nonzero(self.ref_cnt[blocks]))

    def watch(self, ids: BlockArray | Sequence[int]) -> None:
        """Bump :attr:`epoch` when any of ``ids`` is cached (replaces the
        previous watch set). Used to memoise a blocked admission check."""
        self.unwatch()
        watched = np.asarray(ids, np.int64)
        if len(watched):
            self._reserve_ids(int(watched.max()) + 1)
            self._watch_mask[watched] = True
        self._watched = watched

    def unwatch(self) -> None:
        if len(self._watched):
            self._watch_mask[self._watched] = False
            self._watched = EMPTY_BLOCKS

    def watching(self) -> bool:
        """Is a watch set in place?"""
        return len(self._watched) > 0

    def watched(self, content_id: int) -> bool:
        """Is ``content_id`` in the watch set?"""
        return bool(self._watch_mask[content_id]) if len(self._watched) else False

    # -- mutations -----------------------------------------------------------

    def touch(self, blocks: BlockArray) -> None:
        """Take a reference on hit blocks (distinct), pulling free ones out of
        the queue."""
        ref = self.ref_cnt
        r = ref[blocks]
        ref[blocks] = r + 1
        pulled = blocks[r == 0]
        n = len(pulled)
        if n:
            self.epoch += 1
            self.num_free -= n
            unfilled = self._block_id[pulled] < 0
            if unfilled.any():  # free blocks without content sit on the stack
                self._drop_from_front(pulled[unfilled])
                pulled = pulled[~unfilled]
            self._qpos[pulled] = -1
            self._nmain -= len(pulled)

    def _drop_from_front(self, blocks: BlockArray) -> None:
        stack = self._front[: self._top]
        keep = stack[~np.isin(stack, blocks)]
        self._front[: len(keep)] = keep
        self._top = len(keep)

    def allocate(self, num_blocks: int) -> BlockArray:
        """Pop ``num_blocks`` blocks from the head of the free queue, evicting
        the cached content of any popped block (vLLM's ``get_new_blocks``)."""
        if num_blocks > self.num_free:
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {self.num_free} free")
        if num_blocks <= 0:
            return EMPTY_BLOCKS
        self.num_free -= num_blocks
        top = self._top
        if num_blocks <= top:
            out = self._front[top - num_blocks : top][::-1].copy()
            self._top = top - num_blocks
        else:
            popped = self._pop_cached(num_blocks - top)
            if top:
                out = np.concatenate((self._front[:top][::-1], popped))
                self._top = 0
            else:
                out = popped
        self.ref_cnt[out] = 1
        return out

    def allocate_one(self) -> int:
        """``allocate(1)``, as a block number (the common case while decoding)."""
        if not self.num_free:
            raise ValueError("cannot allocate 1 block: none free")
        self.num_free -= 1
        top = self._top
        if top:
            b = int(self._front[top - 1])
            self._top = top - 1
        else:
            # The first live entry of the cached part; evict its content.
            q = self._q
            qpos = self._qpos
            head = self._head
            while True:
                b = int(q[head])
                head += 1
                if qpos[b] == head - 1:
                    break
            self._head = head
            self._nmain -= 1
            qpos[b] = -1
            cid = int(self._block_id[b])
            self._block_id[b] = -1
            self.evictions += 1
            if self._dups and self._has_dup[cid]:
                self._evict_dup(b, cid)
            else:
                self._cached[cid] = -1
        self.ref_cnt[b] = 1
        return b

    def _pop_cached(self, n: int) -> BlockArray:
        """Take the first ``n`` live entries of the cached part of the queue
        and evict their content."""
        q = self._q
        qpos = self._qpos
        arange = self._arange
        head = self._head
        tail = self._tail
        parts: list[BlockArray] = []
        need = n
        span = n
        while True:
            end = min(head + span, tail)
            seg = q[head:end]
            live = qpos[seg] == arange[head:end]
            count = int(np.count_nonzero(live))
            if count >= need:
                if count == end - head and count == need:
                    parts.append(seg)
                    head = end
                else:
                    idx = np.flatnonzero(live)[:need]
                    parts.append(seg[idx])
                    head += int(idx[-1]) + 1
                break
            if count:
                parts.append(seg[live])
            need -= count
            head = end
            span = 2 * max(span, need)
        self._head = head
        self._nmain -= n
        out = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        qpos[out] = -1
        block_id = self._block_id
        ids = block_id[out]
        block_id[out] = -1
        self.evictions += n
        if self._dups:
            several = self._has_dup[ids]
            if several.any():
                for b, cid in zip(out[several].tolist(), ids[several].tolist(), strict=True):
                    self._evict_dup(b, cid)
                ids = ids[~several]
        self._cached[ids] = -1
        return out

    def _evict_dup(self, block: int, cid: int) -> None:
        """Drop ``block`` from the cache entry of a content id with several
        copies (or, once they are gone, the last copy)."""
        dups = self._dups.get(cid)
        if dups is None:
            self._cached[cid] = -1
            return
        if self._cached[cid] == block:
            self._cached[cid] = dups.pop(0)
        else:
            dups.remove(block)
        if not dups:
            del self._dups[cid]
            self._has_dup[cid] = False

    def cache_blocks(self, blocks: BlockArray, ids: BlockArray) -> None:
        """Record that ``blocks[i]`` (now full) holds content ``ids[i]`` (the
        ids distinct, as a sequence's are)."""
        if not self.enable_caching:
            return
        if len(blocks) != len(ids):
            raise ValueError(f"{len(blocks)} blocks but {len(ids)} content ids")
        if not len(ids):
            return
        if len(self._watched) and self._watch_mask[ids].any():
            self.epoch += 1
        self._block_id[blocks] = ids
        cached = self._cached
        prev = cached[ids]
        fresh = prev < 0
        if fresh.all():
            cached[ids] = blocks
            return
        # The oldest block stays the entry; younger copies of the same content
        # (computed concurrently) are kept as duplicates.
        cached[ids[fresh]] = blocks[fresh]
        old = ~fresh
        for b, cid, p in zip(
            blocks[old].tolist(), ids[old].tolist(), prev[old].tolist(), strict=True
        ):
            if p != b:
                self._add_dup(b, cid)

    def _add_dup(self, block: int, cid: int) -> None:
        self._dups.setdefault(cid, []).append(block)
        self._has_dup[cid] = True

    def cache_block(self, block: int, content_id: int) -> None:
        """``cache_blocks`` of one block."""
        if not self.enable_caching:
            return
        if len(self._watched) and self._watch_mask[content_id]:
            self.epoch += 1
        self._block_id[block] = content_id
        prev = int(self._cached[content_id])
        if prev < 0:
            self._cached[content_id] = block
        elif prev != block:
            self._add_dup(block, content_id)

    def free_blocks(self, blocks: BlockArray | Sequence[int]) -> None:
        """Drop one reference from each of ``blocks`` (distinct), given in
        eviction-priority order (first = evicted first), as vLLM's
        ``BlockPool.free_blocks``: blocks reaching zero references go to the
        free queue, those without content to the front (in order), those with
        cached content to the tail (in order). Requests use
        :meth:`free_request`."""
        arr = np.asarray(blocks, np.int64)
        r = self.ref_cnt[arr] - 1
        if (r < 0).any():
            bad = int(arr[int((r < 0).argmax())])
            raise ValueError(f"block {bad} freed more often than referenced")
        self.ref_cnt[arr] = r
        freed = arr[r == 0]
        filled = self._block_id[freed] >= 0 if self.enable_caching else np.zeros(len(freed), bool)
        self._push_cached(freed[filled])
        self._push_front(freed[~filled][::-1])

    def free_request(self, blocks: BlockArray, num_hashed: int) -> None:
        """Free a request's blocks (in allocation order; the first
        ``num_hashed`` hold cached content) the way vLLM's manager does: in
        reverse, so the tail of its sequence is evicted first."""
        if not self.enable_caching:
            num_hashed = 0
        ref = self.ref_cnt
        r = ref[blocks] - 1
        ref[blocks] = r
        freed = r == 0
        # Reversed order puts the unfilled tail first, at the front: pushed in
        # allocation order, the stack's top is the request's last block.
        self._push_front(blocks[num_hashed:][freed[num_hashed:]])
        self._push_cached(blocks[:num_hashed][freed[:num_hashed]][::-1])

    def _push_front(self, blocks: BlockArray) -> None:
        """Push onto the head of the free queue; the last one becomes the head."""
        n = len(blocks)
        if n:
            top = self._top
            self._front[top : top + n] = blocks
            self._top = top + n
            self.num_free += n

    def _push_cached(self, blocks: BlockArray) -> None:
        """Append cached blocks to the tail of the free queue, in order."""
        n = len(blocks)
        if not n:
            return
        if self._tail + n > len(self._q):
            self._compact()
        tail = self._tail
        self._q[tail : tail + n] = blocks
        self._qpos[blocks] = self._arange[tail : tail + n]
        self._tail = tail + n
        self._nmain += n
        self.num_free += n

    def _compact(self) -> None:
        """Move the live cached entries to the start of the array."""
        seg = self._q[self._head : self._tail]
        live = seg[self._qpos[seg] == self._arange[self._head : self._tail]]
        n = len(live)
        self._q[:n] = live
        self._qpos[live] = self._arange[:n]
        self._head = 0
        self._tail = n
