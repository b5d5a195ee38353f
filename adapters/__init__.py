"""Engine adapters: read an engine's state page into an :class:`EngineSignal`.

One pure ``parse(text, timestamp)`` per engine (``concur.adapters.vllm``,
``.sglang``, ``.llamacpp``), an :class:`Adapter` registry with a thin async
:func:`scrape`, and :func:`derive` for per-interval rates from counters.
"""

from __future__ import annotations

from concur.adapters.errors import AdapterError, ScrapeError
from concur.adapters.rates import Rates, derive
from concur.adapters.registry import KINDS, Adapter, all_adapters, get_adapter, scrape
from concur.adapters.signal import EngineSignal

__all__ = [
    "KINDS",
    "Adapter",
    "AdapterError",
    "EngineSignal",
    "Rates",
    "ScrapeError",
    "all_adapters",
    "derive",
    "get_adapter",
    "scrape",
]
