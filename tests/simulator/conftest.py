"""Fixtures for the simulator tests (helpers live in simkit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from simkit import Env, make_env


@pytest_asyncio.fixture
async def env() -> AsyncIterator[Env]:
    """The default environment (async window mode, auto-deliver on)."""
    e = await make_env()
    try:
        yield e
    finally:
        await e.sim.stop()
        await e.client.aclose()
