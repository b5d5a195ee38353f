"""concur: agent-level admission control in front of an LLM engine.

The names below are concur's public surface for embedding it; modules whose names
start with ``_`` are internals. They are imported on first use, so ``import concur``
stays cheap (the simulator's commands do not pull in the server, nor the reverse).

* configuration: :class:`Settings`, :func:`load_settings`, :class:`ConfigError`;
* the control core: :class:`AdmissionGate` (agents, window, queue), :class:`Permit`
  (one request's passage through it, for asyncio callers), :class:`Controller` (one
  policy step per tick), :func:`build_policy` and the policy contract
  (:class:`Policy`, :class:`Observation`, :class:`Decision`);
* the server: :func:`build_app` (the aiohttp application of a :class:`Runtime`),
  :class:`Server`, :func:`serve`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concur._admit import Permit
    from concur.admission import (
        AdmissionError,
        AdmissionGate,
        AgentEnded,
        GateClosed,
        GateEvent,
        QueueFull,
        QueueTimeout,
        Ticket,
    )
    from concur.app import Server, build_app, serve
    from concur.config import ConfigError, Settings, load_settings
    from concur.control import Controller, TickRecord
    from concur.policies import Decision, Observation, Policy, PolicySettings, build_policy
    from concur.runtime import Runtime

_WHERE = {
    "AdmissionError": "concur.admission",
    "AdmissionGate": "concur.admission",
    "AgentEnded": "concur.admission",
    "ConfigError": "concur.config",
    "Controller": "concur.control",
    "Decision": "concur.policies",
    "GateClosed": "concur.admission",
    "GateEvent": "concur.admission",
    "Observation": "concur.policies",
    "Permit": "concur._admit",
    "Policy": "concur.policies",
    "PolicySettings": "concur.policies",
    "QueueFull": "concur.admission",
    "QueueTimeout": "concur.admission",
    "Runtime": "concur.runtime",
    "Server": "concur.app",
    "Settings": "concur.config",
    "Ticket": "concur.admission",
    "TickRecord": "concur.control",
    "build_app": "concur.app",
    "build_policy": "concur.policies",
    "load_settings": "concur.config",
    "serve": "concur.app",
}

__all__ = [
    "AdmissionError",
    "AdmissionGate",
    "AgentEnded",
    "ConfigError",
    "Controller",
    "Decision",
    "GateClosed",
    "GateEvent",
    "Observation",
    "Permit",
    "Policy",
    "PolicySettings",
    "QueueFull",
    "QueueTimeout",
    "Runtime",
    "Server",
    "Settings",
    "TickRecord",
    "Ticket",
    "build_app",
    "build_policy",
    "load_settings",
    "serve",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'concur' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
