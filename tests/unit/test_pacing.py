"""The send window: no second holds more than ``rate`` arrivals at the provider, whatever the delays."""

from __future__ import annotations

import asyncio
import random

import pytest
from tests.helpers import most_in_one_second

from pforte.clock import SystemClock
from pforte.outbox import ratelimit
from pforte.outbox.ratelimit import Pacer


async def test_late_arrivals_never_crowd_a_second_past_the_rate():
    """Requests that reach the provider late (a stalled event loop, a slow network) bunch up with
    punctual ones; spacing alone then lets ``rate + 1`` arrive within one second. The window makes
    every send wait for the answer to the one ``rate`` places before it, so this cannot happen."""
    rate = 20
    pacer = Pacer(rate, SystemClock())
    rng = random.Random(7)
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()

    async def send(delay: float) -> None:
        ticket = await pacer.acquire()
        try:
            await asyncio.sleep(delay)  # on the way to the provider
            arrivals.append(loop.time())  # the provider counts it now
            await asyncio.sleep(rng.uniform(0.0, 0.02))  # the answer on its way back
        finally:
            ticket.done()

    # runs of five requests are held up for 250-400 ms (a stall), far beyond the spacing margin
    delays = [rng.uniform(0.25, 0.4) if i % 25 < 5 else 0.0 for i in range(70)]
    await asyncio.gather(*(send(d) for d in delays))

    assert len(arrivals) == 70
    assert most_in_one_second(arrivals) <= rate


async def test_a_ticket_never_marked_done_blocks_only_until_it_is_declared_stuck(monkeypatch, caplog):
    monkeypatch.setattr(ratelimit, "STUCK_AFTER_S", 0.05)
    pacer = Pacer(2, SystemClock(), margin=0.0)
    await pacer.acquire()  # never done: a caller bug
    (await pacer.acquire()).done()
    with caplog.at_level("WARNING", logger="pforte.outbox"):
        third = await asyncio.wait_for(pacer.acquire(), 3.0)
    third.done()
    assert [r.getMessage() for r in caplog.records] == ["pacing: a send's answer never came back"]


async def test_chunks_take_consecutive_slots_and_keep_the_window():
    """``acquire_many`` reserves a chunk's slots in one step: chunks queued together follow one
    another (no interleaving), each returns at its last slot, and stalled chunks still never put
    more than ``rate`` arrivals into one second."""
    rate = 40
    clock = SystemClock()
    pacer = Pacer(rate, clock, margin=0.0)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    returned: list[float] = []

    async def chunk(n: int, stall: float) -> None:
        tickets = await pacer.acquire_many(n)
        returned.append(loop.time())
        assert len(tickets) == n

        async def one(ticket: ratelimit.Ticket) -> None:
            try:
                await asyncio.sleep(stall)
                arrivals.append(loop.time())
            finally:
                ticket.done()

        await asyncio.gather(*(one(t) for t in tickets))

    start = loop.time()
    # eight chunks of ten (2 s of rate); every third one stalls on its way out
    await asyncio.gather(*(chunk(10, 0.3 if i % 3 == 0 else 0.0) for i in range(8)))

    assert len(arrivals) == 80
    assert most_in_one_second(arrivals) <= rate
    # the k-th chunk returned no earlier than its last slot: (10k - 1) intervals after the start
    for k, at in enumerate(sorted(returned), start=1):
        assert at - start >= (10 * k - 1) / rate - 0.01


async def test_chunks_queued_on_a_full_window_never_wait_for_each_other(monkeypatch):
    """When answers are slow the window fills and chunks queue for it. Each chunk takes its places
    in one go: were they handed out one at a time, chunks would interleave, and the chunk at the
    front would wait for the end of a send whose chunk is still queued behind it (a deadlock that
    stalled SQLite sends at 80/s until the stuck-ticket timeout)."""
    monkeypatch.setattr(ratelimit, "STUCK_AFTER_S", 60.0)
    rate = 8
    pacer = Pacer(rate, SystemClock(), margin=0.0)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []

    async def chunk() -> None:
        tickets = await pacer.acquire_many(3)

        async def one(ticket: ratelimit.Ticket) -> None:
            try:
                arrivals.append(loop.time())
                await asyncio.sleep(0.6)  # a slow answer
            finally:
                ticket.done()

        await asyncio.gather(*(one(t) for t in tickets))

    await asyncio.wait_for(asyncio.gather(*(chunk() for _ in range(10))), 20.0)
    assert len(arrivals) == 30
    assert most_in_one_second(arrivals) <= rate


async def test_a_chunk_larger_than_the_window_is_refused():
    """More sends than the rate cannot share one window: refused at once instead of waiting for
    ever on its own first send."""
    pacer = Pacer(5, SystemClock())
    with pytest.raises(ValueError, match="does not fit"):
        await pacer.acquire_many(6)
    assert len(await pacer.acquire_many(5)) == 5
