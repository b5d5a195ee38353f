"""AIMD over the number of live agents, like TCP's congestion window.

Congestion (pressure above ``high``, new preemptions, or a hit rate below
``hit_floor``) multiplies the window by ``beta``, at most once per
``decrease_cooldown`` so one sustained reading does not collapse it to
``min_window``, and not at all while paused agents' steps still run in the engine
(their cache frees as they end: the reading is theirs, not the live agents'). The
engine's KV usage alone cuts only once it has lasted ``kv_confirm`` seconds.
Headroom (pressure below ``low``) adds ``alpha``, but only while the window is in
use, so an idle window does not grow without bound. Because concur sees the working
set, it need not probe blindly: with ``increase="fit"`` (the default) headroom
admits at once as many waiting agents as fit under ``low`` with their current
contexts (at least ``alpha``); step-boundary pausing corrects the overshoot when
those contexts grow.

Presets (``aimd:<name>``): ``kv`` (engine KV usage alone, admission only),
``admission`` (the default pressure, no pausing), ``projected`` (anticipated
growth instead of pausing) and ``paper``, CONCUR's own law (arXiv 2601.22705):
engine KV usage only, low 0.2 / high 0.5, and a decrease only when usage is high
*and* the hit rate has fallen below 0.2.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from concur.policies import pressure as pressure_mod
from concur.policies.base import Decision, Observation
from concur.policies.engine_load import EngineLoad, Mode
from concur.policies.pressure import PressureSource

Fraction = Annotated[float, Field(ge=0.0, le=1.5)]


class AIMDParams(BaseModel):
    """Parameters of the AIMD window controller (validated once, then frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    pressure: tuple[PressureSource, ...] = ("kv", "working_set")
    """Sources of pressure, combined by max. The default keeps engine KV usage in it."""
    high: Fraction = 0.85
    """Congestion above this pressure: shrink the window (and pause, if enabled)."""
    low: Fraction = 0.75
    """Headroom below this pressure: grow the window while it is in use; a decrease pauses
    live agents until the working set is back under it."""
    alpha: int = Field(1, ge=1, le=1024)
    """Additive increase per tick, and the most agents released per tick."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """Multiplicative decrease factor."""
    initial_window: int = Field(8, ge=1)
    """Window at start, before any feedback."""
    min_window: int = Field(1, ge=1)
    """Never shrink the window below this many agents."""
    max_window: int = Field(1024, ge=1)
    """Never grow the window above this many agents."""
    decrease_cooldown: float = Field(5.0, ge=0.0)
    """Seconds between two decreases."""
    on_preemption: bool = True
    """Treat new engine preemptions as congestion."""
    kv_confirm: float = Field(0.5, ge=0.0)
    """Seconds the engine's KV usage must stay over ``high`` before it alone (no
    working-set target, no preemption) cuts the window: the gauge peaks for an instant as
    steps end, and lags agents that have just left the live set. 0: cut on one reading."""
    hit_floor: float | None = Field(None, ge=0.0, le=1.0)
    """Treat a hit rate below this as congestion (``None`` = off)."""
    require_low_hit: bool = False
    """Decrease only when pressure is high *and* the hit rate is below ``hit_floor`` (paper)."""
    pause: bool = True
    """Step-boundary pausing: hold the next request of the newest live agents beyond the window."""
    increase: Literal["additive", "fit"] = "fit"
    """On headroom, grow by ``alpha`` (``additive``), or by as many waiting agents as fit
    under ``low`` with their contexts, at least ``alpha`` (``fit``)."""
    engine_aware: bool = True
    """Congestion of the cache alone is no reason to idle the engine: when the cache holds
    agents back while the engine stays under ``busy_low``, open up (no limit, nobody
    paused) for as long as requests complete faster than they did resident (see
    :mod:`concur.policies.engine_load`). Off: keep the working set resident whatever the
    engine's load (the ``cache`` preset)."""
    busy_low: float = Field(0.7, gt=0.0, le=1.0)
    """Open up when the engine had the agents' work less than this share of the time.
    Opening pays while the idle time it fills is worth more than the prefixes it makes the
    engine recompute: at a resident busy share ``b``, about while ``b < 1 / (1 + r)``, with
    ``r`` a miss's recomputation over a step's own engine time. 0.8 lost on the CPU engine,
    whose prefill is slow (engine-bound swarm: it opened in 2 of 3 runs, 1.2x slower than
    resident); a GPU's fast prefill tolerates more (docs/real-engine.md)."""
    start_open: bool = True
    """Start open (no limit, with ``engine_aware``): an agent held back at the start is late
    for its whole life, and nothing says yet that the engine is the bottleneck. Off: start
    resident, with ``initial_window``."""
    share_high: float = Field(0.75, gt=0.0, le=1.0)
    """Open, close (keep the working set resident) when the cache is congested and the
    agents spend more than this share of their cycle waiting on the engine: the engine is
    then the bottleneck, and every prefix it recomputes is taken from useful work."""
    open_dwell_cycles: float = Field(2.0, ge=0.0)
    """Agent cycles (a request and its tool call) the engine must stay under ``busy_low``
    before opening (once agents wait, or the cache congests); open, how long before
    judging whether it pays."""
    open_dwell: float = Field(2.0, ge=0.0)
    """... and at least this many seconds."""

    @field_validator("pressure", mode="before")
    @classmethod
    def _parse_pressure(cls, v: Any) -> Any:
        return pressure_mod.parse_sources(v)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.min_window > self.max_window:
            raise ValueError(
                f"min_window ({self.min_window}) must not exceed max_window ({self.max_window})"
            )
        if not self.min_window <= self.initial_window <= self.max_window:
            raise ValueError(
                f"initial_window ({self.initial_window}) must lie in "
                f"[min_window, max_window] = [{self.min_window}, {self.max_window}]"
            )
        if self.require_low_hit and self.hit_floor is None:
            raise ValueError("require_low_hit needs hit_floor to be set")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The working set kept resident whatever the engine's load: the default before it
    # was measured on a real engine (1.6x slower than no control on a tool-bound swarm).
    "cache": {"engine_aware": False},
    # Engine KV usage alone, admission only: the controller DESIGN section 4 measured
    # on vLLM's scheduler (decrease above 0.85, increase below 0.5).
    "kv": {
        "pressure": ("kv",),
        "kv_confirm": 0.0,
        "low": 0.5,
        "pause": False,
        "increase": "additive",
        "engine_aware": False,
    },
    # The default pressure without step-boundary pausing: what pausing buys.
    "admission": {"pause": False, "engine_aware": False},
    # Anticipate growth instead of pausing.
    "projected": {"pressure": ("kv", "projected"), "pause": False, "engine_aware": False},
    "paper": {
        "increase": "additive",
        "pressure": ("kv",),
        "low": 0.2,
        "high": 0.5,
        "hit_floor": 0.2,
        "require_low_hit": True,
        "alpha": 2,
        "beta": 0.5,
        "on_preemption": False,
        "kv_confirm": 0.0,
        "pause": False,
        "engine_aware": False,
    },
}


class AIMD:
    """Additive-increase, multiplicative-decrease window over live agents."""

    name = "aimd"

    def __init__(self, params: AIMDParams | None = None, *, preset: str = "default") -> None:
        self.params = params or AIMDParams()
        self.preset = preset
        self.window = self.params.initial_window
        self._last_decrease: float | None = None
        self._kv_high_since: float | None = None
        prm = self.params
        self.load = EngineLoad(
            busy_low=prm.busy_low,
            share_high=prm.share_high,
            dwell_cycles=prm.open_dwell_cycles,
            min_dwell_s=prm.open_dwell,
            mode=Mode.OPEN if self._starts_open() else Mode.RESIDENT,
        )

    def _starts_open(self) -> bool:
        return self.params.engine_aware and self.params.start_open

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "preset": self.preset, **self.params.model_dump()}

    def initial_window(self) -> int | None:
        return None if self._starts_open() else self.params.initial_window

    def resume_from(self, window: int | None, live: int) -> int | None:
        """A live retune keeps what was learned: the window in force, within this
        policy's bounds, resident; after no limit, open if this policy starts open, else
        the agents running."""
        prm = self.params
        # Open before, open now: the evidence to close comes as it did.
        stays_open = window is None and self.load.mode is Mode.OPEN
        if not stays_open:
            self.load.mode = Mode.RESIDENT
        seed = window if window is not None else live
        self.window = min(prm.max_window, max(prm.min_window, seed))
        return None if stays_open else self.window

    def _congested(self, p: float | None, obs: Observation) -> tuple[bool, str]:
        prm = self.params
        high = p is not None and p > prm.high
        low_hit = (
            prm.hit_floor is not None and obs.hit_rate is not None and obs.hit_rate < prm.hit_floor
        )
        if prm.require_low_hit:
            return (high and low_hit), "pressure+hit_rate"
        if high:
            return True, "pressure"
        if self._preempted(obs):
            return True, "preemptions"
        if low_hit:
            return True, "hit_rate"
        return False, ""

    def decide(self, obs: Observation) -> Decision:
        prm = self.params
        values = pressure_mod.parts(obs)
        p = pressure_mod.combine(values, prm.pressure)
        if prm.engine_aware:
            # With no agent at all the engine's idleness says nothing about a swarm (a
            # sidecar waits hours for one): such intervals are not averaged in.
            agents = obs.live + obs.paused + obs.queued > 0
            self.load.update(
                obs.now,
                obs.interval_s,
                obs.busy if agents else None,
                obs.completed,
                obs.latency_s,
                obs.tool_s,
                obs.served_tokens,
            )
            if obs.interval_s and obs.busy is None and self.load.mode is Mode.OPEN:
                # A gate that times no requests: no evidence to close on will ever come,
                # so the cache law holds (concur's own gate always times them).
                self.load.mode = Mode.RESIDENT
            # Agents wait only because the cache law holds them back.
            held_back = obs.queued + obs.paused > 0
            was = self.load.mode
            if self.load.step(obs.now, held_back, p is not None and p > prm.high) is Mode.OPEN:
                return self._open(obs, p, values)
            if was is Mode.OPEN:  # closing in: from the agents running now
                self.window = max(prm.min_window, min(prm.max_window, obs.live))
        congested, why = self._congested(p, obs)
        reason = "hold"
        release = prm.alpha
        target = self._fits_under_low(obs) if congested else None
        kv_only = why == "pressure" and target is None
        if not kv_only or obs.draining:
            # The KV usage alone is not what congests, or the reading is the draining
            # agents': either way it does not count towards kv_confirm.
            self._kv_high_since = None
        if congested and target is None and obs.draining:
            # The engine's signals lag: it still runs the requests of agents already
            # paused, and their cache frees as they end. A cut now would pause agents
            # for cache that is not theirs (a swarm closing in from open collapsed so
            # to one agent). What is left once they end is judged then.
            reason = "draining"
        elif kv_only and not self._kv_confirmed(obs):
            reason = "confirm"
        elif congested:
            reason = self._decrease(obs.now, why, target)
        elif p is not None and p < prm.low and obs.in_use:
            step = prm.alpha
            if prm.increase == "fit" and obs.candidate_contexts:
                # What fits under low with the contexts they have; nothing, if none fits.
                fits = pressure_mod.fitting_candidates(obs, prm.pressure, prm.low)
                step = obs.live + fits - self.window
            new = min(prm.max_window, self.window + step)
            if new > self.window:
                reason = "increase"
                release = max(prm.alpha, new - self.window)
                self.window = new
            elif step > 0:
                reason = "at_max"
        pause = prm.pause and p is not None and p > prm.high
        return Decision(
            window=self.window,
            pressure=p,
            parts=values,
            reason=reason,
            pause=pause,
            release_limit=release,
        )

    def _kv_confirmed(self, obs: Observation) -> bool:
        """Whether the KV usage over ``high`` has lasted ``kv_confirm`` seconds (new
        preemptions confirm it at once). On the real engine, 6 of 7 cuts on one such
        reading read under ``low`` a second later (docs/real-engine.md)."""
        if self._preempted(obs):
            return True
        if self._kv_high_since is None:
            self._kv_high_since = obs.now
        return obs.now - self._kv_high_since >= self.params.kv_confirm

    def _preempted(self, obs: Observation) -> bool:
        """New engine preemptions, when they count as congestion (``on_preemption``)."""
        n = obs.new_preemptions
        return self.params.on_preemption and n is not None and n > 0

    def _fits_under_low(self, obs: Observation) -> int | None:
        """How many live agents, oldest first, keep the working set at or under ``low``
        (``None`` when the working set is not among the pressure's sources, unknown, or
        not over ``high``: then the congestion came from elsewhere)."""
        prm = self.params
        cap = obs.capacity_tokens
        if not cap or not {"working_set", "projected"} & set(prm.pressure):
            return None
        tokens = obs.live_tokens + (obs.growth_tokens if "projected" in prm.pressure else 0.0)
        if tokens <= prm.high * cap:
            return None  # the congestion is not the working set's: no target from it
        keep = obs.live
        for ctx in obs.live_contexts_newest_first:
            if tokens <= prm.low * cap:
                break
            tokens -= ctx
            keep -= 1
        return keep

    def _decrease(self, now: float, why: str, target: int | None = None) -> str:
        """Shrink the window; returns the reason.

        With a ``target`` (the live agents that keep the working set under ``low``), to
        it at once: the working set is known exactly and falls as soon as agents are
        paused. Otherwise (engine KV usage, preemptions: signals that lag) by ``beta``,
        at most once per ``decrease_cooldown``, so one sustained reading does not
        collapse the window."""
        prm = self.params
        if target is not None and target < self.window:
            new = max(prm.min_window, target)
        elif self._last_decrease is not None and now - self._last_decrease < prm.decrease_cooldown:
            return "cooldown"
        else:
            new = max(prm.min_window, math.floor(self.window * prm.beta))
        reason = f"decrease:{why}" if new < self.window else "at_min"
        self.window = new
        self._last_decrease = now
        return reason

    def _open(self, obs: Observation, p: float | None, values: dict[str, float | None]) -> Decision:
        """Open mode: no limit and nobody paused (misses, preemptions and the engine's own
        queue cost less than an idle engine)."""
        self.window = max(self.window, obs.live)
        return Decision(window=None, pressure=p, parts=values, reason="open")
