"""The gate's running account of request timing: what :class:`Pace` snapshots."""

from __future__ import annotations

from concur._gate_model import Pace


class PaceMeter:
    """Cumulative request timing, in the gate's clock (see :class:`Pace`)."""

    __slots__ = (
        "_busy_from",
        "_busy_s",
        "_granted_now",
        "_latency_s",
        "_requests",
        "_served",
        "_tool_s",
        "_tools",
    )

    def __init__(self) -> None:
        self._granted_now = 0
        """Granted requests in flight now."""
        self._busy_from = 0.0
        """Since when the engine has had one."""
        self._busy_s = 0.0
        self._requests = 0
        self._latency_s = 0.0
        self._tools = 0
        self._tool_s = 0.0
        self._served = 0

    def granted(self, now: float) -> None:
        """A request was granted at ``now``."""
        if not self._granted_now:
            self._busy_from = now
        self._granted_now += 1

    def ended(self, granted_at: float, now: float) -> None:
        """A request granted at ``granted_at`` ended at ``now`` (finished or given up)."""
        self._granted_now -= 1
        if not self._granted_now:
            self._busy_s += now - self._busy_from
        self._requests += 1
        self._latency_s += now - granted_at

    def tool_returned(self, pause: float) -> None:
        """An admitted agent came back after a ``pause`` since its last response."""
        self._tools += 1
        self._tool_s += pause

    def served(self, tokens: int) -> None:
        """A finished request reported its context at ``tokens``."""
        self._served += tokens

    def snapshot(self, now: float) -> Pace:
        """The timing so far (the busy period in progress included)."""
        busy = self._busy_s
        if self._granted_now:
            busy += now - self._busy_from
        return Pace(busy, self._requests, self._latency_s, self._tools, self._tool_s, self._served)
