"""Per-request deadlines on one shared timer: upstream timeouts and the client send timeout.

Every in-flight request has a deadline or two, and most never fire. Instead of an
asyncio timer handle per request (created, cancelled and re-created per chunk),
:class:`Deadlines` keeps them all in one heap behind a single ``loop.call_at``;
:class:`UpstreamTimer` enforces ``upstream.first_byte_timeout`` and
``upstream.read_timeout``, :class:`SendWatch` ``server.send_timeout``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any, Protocol

from concur.upstream import UpstreamResponse


class _Timer(Protocol):
    def armed_for(self, when: float) -> bool: ...

    def fire(self) -> None: ...


class UpstreamReadTimeout(TimeoutError):
    """The upstream sent nothing for ``upstream.read_timeout`` seconds mid-body."""


class Deadlines:
    """The deadlines of all in-flight requests, on one asyncio timer handle.

    A heap of ``(when, seq, timer)`` (compared in C, unlike asyncio's timer handles)
    and one ``loop.call_at`` for the earliest entry, re-armed only when a new deadline
    comes before it: a timer adds one heap entry, and stopping it only marks the entry
    stale. An entry counts only if its timer is still armed for that instant; stale
    entries are dropped when they come up, or all at once when they are most of the heap.
    """

    __slots__ = ("_handle", "_heap", "_seq", "_stale", "_when", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf
        self._stale = 0

    def add(self, when: float, timer: _Timer) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        if when < self._when:
            self._arm(when)

    def dropped(self) -> None:
        """One entry no longer counts (its timer was cancelled or re-armed)."""
        self._stale += 1
        heap = self._heap
        if self._stale > 64 and 2 * self._stale > len(heap):
            heap[:] = [e for e in heap if e[2].armed_for(e[0])]
            heapq.heapify(heap)
            self._stale = 0

    def __len__(self) -> int:
        """Heap entries, stale ones included."""
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = when
        self._handle = self.loop.call_at(when, self._run)

    def _run(self) -> None:
        due = max(self._when, self.loop.time())  # (asyncio may run a handle a hair early)
        self._handle = None
        self._when = math.inf
        heap = self._heap
        while heap and heap[0][0] <= due:
            when, _, timer = heapq.heappop(heap)
            if timer.armed_for(when):
                timer.fire()
            elif self._stale > 0:
                self._stale -= 1
        if heap and heap[0][0] < self._when:  # (a timer fired above may have armed a later one)
            self._arm(heap[0][0])


class UpstreamTimer:
    """Both upstream timeouts of one request on one deadline (see :class:`Deadlines`).

    First the response headers get ``first_byte`` seconds: when they pass, the
    request's task is cancelled, as ``asyncio.timeout`` would, and :meth:`failed`
    reports the timeout. Then the body may be silent for ``read`` seconds between
    chunks: the response stamps ``since`` while a read waits for the upstream, and
    the deadline, re-armed only when it comes up early (not per chunk), fails the
    body with :class:`UpstreamReadTimeout` once a read has waited too long. Time
    spent writing to a slow client is not silence.

    The first deadline is the earlier of the first-byte one and ``read`` seconds from
    the start, which is never later than the first read deadline can be, so it is kept
    when the headers arrive. Coming up before the headers and before the first-byte
    deadline (a wait longer than ``read``), it re-arms for that deadline.
    """

    __slots__ = (
        "_body",
        "_cancelling",
        "_deadline",
        "_deadlines",
        "_expired",
        "_read",
        "_stream",
        "_task",
        "_when",
    )

    def __init__(self, deadlines: Deadlines, first_byte: float | None, read: float | None) -> None:
        self._deadlines = deadlines
        self._read = read
        self._body = False
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._expired = False
        self._stream: UpstreamResponse | None = None
        self._deadline = math.inf
        self._when: float | None = None
        """The instant the timer is armed for (None: not armed)."""
        if first_byte is not None:
            loop = deadlines.loop
            self._task = asyncio.current_task(loop)
            if self._task is None:
                raise RuntimeError("UpstreamTimer must be created inside a task")
            self._cancelling = self._task.cancelling()
            now = loop.time()
            self._deadline = now + first_byte
            self._arm(now + read if read is not None and read < first_byte else self._deadline)

    def failed(self, cancelled: bool) -> bool:
        """No response: stop the timer; True when the first-byte deadline cancelled the task."""
        expired = self._uncancel()
        self.cancel()
        return expired and cancelled

    def responded(self, stream: UpstreamResponse) -> None:
        """The headers are in: watch ``stream`` for silence from now on."""
        self._uncancel()  # (a deadline that fired in the same instant still cancels, as before)
        self._body = True
        self._stream = stream
        if self._read is None:
            self.cancel()
        elif self._when is None:
            self._arm(self._deadlines.loop.time() + self._read)
        # else: armed no later than now + read (see the class docstring).

    def cancel(self) -> None:
        """Stop for good. A stale heap entry may outlive the request: it keeps no more
        than this small object."""
        if self._when is not None:
            self._when = None
            self._deadlines.dropped()
        self._stream = None
        self._task = None

    def armed_for(self, when: float) -> bool:
        return self._when == when

    def _arm(self, when: float) -> None:
        self._when = when
        self._deadlines.add(when, self)

    def _uncancel(self) -> bool:
        """Undo the first-byte deadline's cancel; True if it was the only one pending."""
        if not self._expired:
            return False
        self._expired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def fire(self) -> None:
        """Its deadline came up (called by :class:`Deadlines`, which dropped the entry)."""
        when, self._when = self._when, None
        if not self._body:
            if when is not None and when < self._deadline:
                self._arm(self._deadline)  # armed for an early read deadline: not yet
                return
            self._expired = True
            assert self._task is not None
            self._task.cancel()
            return
        assert self._read is not None and self._stream is not None
        now = self._deadlines.loop.time()
        since = self._stream.since
        if since is not None and now - since >= self._read:
            self._stream.set_exception(
                UpstreamReadTimeout(
                    f"no data from the upstream for {self._read:g}s (upstream.read_timeout)"
                )
            )
            return
        self._arm(now + self._read if since is None else since + self._read)


class SendWatch:
    """``server.send_timeout`` for one response: a client that stops reading.

    The relay counts the writes it starts (:attr:`writes`) and says while one is
    under way (:attr:`writing`); a write waits only while the client's socket and
    the transport's buffer are full. Every ``limit`` seconds the watch looks, and
    reads ``unsent()`` (the bytes still on their way to the client: the proxy counts
    the transport's buffer and the socket's send queue). When a write that
    had already started at the previous look is still under way and nothing of the
    buffer went out since, the client read nothing for at least ``limit`` seconds:
    ``on_stuck`` runs (the proxy closes the client's connection, which ends the
    write and frees the agent's slot). A slow reader empties the buffer bit by bit
    and is never cut off, however long one large write takes. Per chunk this costs
    two attribute stores, and per request one heap entry every ``limit`` seconds.
    """

    __slots__ = (
        "_deadlines",
        "_limit",
        "_on_stuck",
        "_seen",
        "_seen_unsent",
        "_unsent",
        "_when",
        "writes",
        "writing",
    )

    def __init__(
        self,
        deadlines: Deadlines,
        limit: float,
        on_stuck: Callable[[], None],
        unsent: Callable[[], int],
    ) -> None:
        self._deadlines = deadlines
        self._limit = limit
        self._on_stuck = on_stuck
        self._unsent = unsent
        self.writes = 0
        self.writing = False
        self._seen = -1
        self._seen_unsent = 0
        self._when: float | None = None
        self._arm()

    def cancel(self) -> None:
        if self._when is not None:
            self._when = None
            self._deadlines.dropped()

    def armed_for(self, when: float) -> bool:
        return self._when == when

    def fire(self) -> None:
        self._when = None
        unsent = self._unsent()
        if self.writing and self.writes == self._seen and unsent >= self._seen_unsent:
            self._on_stuck()
            return
        self._seen = self.writes
        self._seen_unsent = unsent
        self._arm()

    def _arm(self) -> None:
        self._when = self._deadlines.loop.time() + self._limit
        self._deadlines.add(self._when, self)
