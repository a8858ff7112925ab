"""The decrypted-channel cache: one database load however many requests miss it at once."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

import pytest

from pforte.channels import service
from pforte.channels.service import ChannelCache
from pforte.errors import NotFoundError


class _Loads:
    """Stands in for ``service.runtime``: counts loads; each takes a moment, as a query does."""

    def __init__(self) -> None:
        self.count = 0
        self.missing: set[str] = set()

    async def __call__(self, *, session: Any, keys: Any, channel_id: str) -> Any:
        self.count += 1
        await asyncio.sleep(0.02)
        if channel_id in self.missing:
            raise NotFoundError("channel not found")
        return (channel_id, self.count)


@asynccontextmanager
async def _session():
    yield object()


@pytest.fixture
def loads(monkeypatch):
    fake = _Loads()
    monkeypatch.setattr(service, "runtime", fake)
    return fake


async def test_requests_that_miss_together_share_one_load(loads):
    cache = ChannelCache(keys=None, ttl=60.0)  # type: ignore[arg-type]
    got = await asyncio.gather(*(cache.get(_session, "ch1") for _ in range(64)))
    assert loads.count == 1
    assert set(got) == {("ch1", 1)}
    assert await cache.get(_session, "ch1") == ("ch1", 1)  # kept
    assert loads.count == 1


async def test_an_expired_entry_is_loaded_again_once(loads):
    cache = ChannelCache(keys=None, ttl=0.0)  # type: ignore[arg-type]
    await cache.get(_session, "ch1")
    await asyncio.gather(*(cache.get(_session, "ch1") for _ in range(10)))
    assert loads.count == 2


async def test_a_failed_load_fails_every_waiter_and_is_not_kept(loads):
    cache = ChannelCache(keys=None, ttl=60.0)  # type: ignore[arg-type]
    loads.missing.add("gone")
    results = await asyncio.gather(*(cache.get(_session, "gone") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, NotFoundError) for r in results)
    assert loads.count == 1
    loads.missing.clear()
    assert await cache.get(_session, "gone") == ("gone", 2)


async def test_a_load_begun_before_invalidate_is_not_kept(loads):
    cache = ChannelCache(keys=None, ttl=60.0)  # type: ignore[arg-type]
    first = asyncio.ensure_future(cache.get(_session, "ch1"))
    await asyncio.sleep(0)  # the load has started
    cache.invalidate("ch1")  # e.g. the channel's token was changed meanwhile
    assert await first == ("ch1", 1)
    assert await cache.get(_session, "ch1") == ("ch1", 2)  # loaded again, with the new settings


async def test_a_cancelled_caller_does_not_cancel_the_others(loads):
    cache = ChannelCache(keys=None, ttl=60.0)  # type: ignore[arg-type]
    leaving = asyncio.ensure_future(cache.get(_session, "ch1"))
    staying = asyncio.ensure_future(cache.get(_session, "ch1"))
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == ("ch1", 1)
    assert loads.count == 1
