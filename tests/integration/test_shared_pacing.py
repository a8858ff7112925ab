"""Pacing shared by several processes on one PostgreSQL: together they never put more than the
channel's rate into one second at the provider, whatever delays one of them suffers.

Each "process" here is its own ``Database`` (its own connection pool) and its own pacer, as in two
``pforte serve`` processes; only the database is shared.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import text
from tests.helpers import most_in_one_second

from pforte.clock import SystemClock
from pforte.db import Database
from pforte.db import new_id as new_channel_id
from pforte.outbox import ratelimit
from pforte.outbox.ratelimit import SharedPacer, Ticket


class TwoProcesses(list[Database]):
    """Two databases (pools) on one PostgreSQL; pacers made by ``pacers`` settle before they close."""

    def __init__(self, dbs: list[Database]) -> None:
        super().__init__(dbs)
        self.made: list[SharedPacer] = []

    def pacers(self, channel: str, rate: int, clock: SystemClock) -> list[SharedPacer]:
        """One pacer of the channel per process."""
        made = [SharedPacer(channel, rate, db, clock) for db in self]
        self.made += made
        return made


@pytest.fixture
async def two_processes(pg_url):
    procs = TwoProcesses([Database(pg_url, pool_size=4), Database(pg_url, pool_size=4)])
    yield procs
    for pacer in procs.made:  # as Services.stop does: no give-back left holding a connection
        await pacer.settle()
    for db in procs:
        await db.dispose()


async def _chunk(pacer: SharedPacer, n: int, stall: float, arrivals: list[float]) -> None:
    """Send a chunk of ``n``: every request is ``stall`` seconds on its way to the provider."""
    loop = asyncio.get_running_loop()
    tickets = await pacer.acquire_many(n)

    async def one(ticket: Ticket) -> None:
        try:
            await asyncio.sleep(stall)
            arrivals.append(loop.time())  # the provider counts it now
            await asyncio.sleep(0.005)  # the answer on its way back
        finally:
            ticket.done()

    await asyncio.gather(*(one(t) for t in tickets))


async def test_two_processes_never_exceed_the_rate_when_one_of_them_is_late(two_processes):
    """Process A's requests reach the provider 0.3-0.5 s after they start (a busy event loop, a
    slow link); B's arrive at once. A window kept per process counts only its own sends: A's late
    arrivals then land in the same second as B's punctual ones, and the Cloud API answers 130429.
    The window is shared, so each send waits for the end of the send ``rate`` places before it,
    whichever process made it."""
    rate = 20
    channel = new_channel_id()
    clock = SystemClock()
    a, b = two_processes.pacers(channel, rate, clock)
    rng = random.Random(3)
    arrivals: list[float] = []
    await asyncio.gather(
        *(_chunk(a, 5, rng.uniform(0.3, 0.5), arrivals) for _ in range(8)),
        *(_chunk(b, 5, 0.0, arrivals) for _ in range(8)),
    )
    assert len(arrivals) == 80
    assert most_in_one_second(arrivals) <= rate


async def test_single_sends_and_chunks_share_one_window(two_processes):
    """Single sends (media uploads, read receipts) take places in the same shared window."""
    rate = 10
    channel = new_channel_id()
    clock = SystemClock()
    a, b = two_processes.pacers(channel, rate, clock)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []

    async def single(delay: float) -> None:
        ticket = await a.acquire()
        try:
            await asyncio.sleep(delay)
            arrivals.append(loop.time())
        finally:
            ticket.done()

    await asyncio.gather(
        *(single(0.4 if i % 2 else 0.0) for i in range(12)),
        *(_chunk(b, 3, 0.0, arrivals) for _ in range(4)),
    )
    assert len(arrivals) == 24
    assert most_in_one_second(arrivals) <= rate


async def test_places_held_by_a_process_that_died_come_back_after_the_lease(two_processes, monkeypatch):
    """A process killed between taking its places and giving them back cannot block the channel
    for ever: once its lease has run out, another process takes the places (one window later)."""
    monkeypatch.setattr(ratelimit, "LEASE_S", 0.5)
    rate = 4
    channel = new_channel_id()
    clock = SystemClock()
    dead = SharedPacer(channel, rate, two_processes[0], clock)  # never settled: it "died"
    alive = two_processes.pacers(channel, rate, clock)[1]
    await dead.acquire_many(rate)  # every place taken, never given back: the process "died"
    loop = asyncio.get_running_loop()
    start = loop.time()
    arrivals: list[float] = []
    await asyncio.wait_for(_chunk(alive, 2, 0.0, arrivals), 10.0)
    assert len(arrivals) == 2
    assert arrivals[0] - start >= 0.5 + 1.0 - 0.05  # the lease ran out, then one window passed


async def test_a_chunk_larger_than_the_window_is_refused(two_processes):
    pacer = SharedPacer(new_channel_id(), 5, two_processes[0], SystemClock())
    with pytest.raises(ValueError, match="does not fit"):
        await pacer.acquire_many(6)


async def test_settle_gives_back_the_places_of_finished_sends(two_processes):
    """On shutdown (``Services.stop``) a process gives back the places of its finished sends before
    its pool closes; they are free for the other processes at once, not after the lease."""
    rate = 4
    channel = new_channel_id()
    clock = SystemClock()
    a, _ = two_processes.pacers(channel, rate, clock)
    for ticket in await a.acquire_many(rate):
        ticket.done()
    await a.settle()
    async with two_processes[1].engine.connect() as conn:
        held = (
            await conn.execute(
                text("SELECT count(*) FROM send_places WHERE channel_id = :c AND holder IS NOT NULL"),
                {"c": channel},
            )
        ).scalar_one()
    assert held == 0
    assert two_processes[0].engine.pool.checkedout() == 0
