"""Fixtures for the fault matrix: a fault-injecting fake vLLM, concur in front of it, a ledger.

Every concur started here is checked at teardown for an empty gate (active == 0,
queued == 0), like the proxy tests; the invariants proper are asserted by each
test through :func:`fakes.invariants.assert_invariants`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import FAST, Start, concur_starter
from fakes.invariants import Ledger

# Failing polls back off (poll_interval x 2^n): short intervals keep recovery quick;
# stale_after leaves room for a slow poll on a busy machine.
RELIABILITY = {
    **FAST,
    "engine.poll_interval": 0.02,
    "engine.poll_timeout": 0.3,
    "engine.stale_after": 0.4,
    "control.interval": 0.02,
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM(strict_json=True) as f:
        yield f


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def start_concur(fake: FakeVLLM) -> AsyncIterator[Start]:
    """``await start_concur(**{"dotted.key": value})``: concur in front of ``fake``."""
    async with concur_starter(fake.url, RELIABILITY) as start:
        yield start
