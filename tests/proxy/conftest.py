"""Fixtures for the proxy tests: a fake vLLM and concur, both real servers on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fakes.fake_vllm import FakeVLLM
from fakes.harness import FAST, Start, concur_starter


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM() as f:
        yield f


@pytest.fixture
async def start_concur(fake: FakeVLLM) -> AsyncIterator[Start]:
    """``await start_concur(**{"dotted.key": value})``: concur in front of ``fake``.

    At teardown every scenario must have left the gate empty: active == 0, queued == 0.
    """
    async with concur_starter(fake.url, FAST) as start:
        yield start
