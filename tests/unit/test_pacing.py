"""The send window: no second holds more than ``rate`` arrivals at the provider, whatever the delays."""

from __future__ import annotations

import asyncio
import random

from pforte.clock import SystemClock
from pforte.outbox.ratelimit import Pacer


def _most_in_one_second(arrivals: list[float]) -> int:
    arrivals = sorted(arrivals)
    return max(sum(1 for u in arrivals[i:] if u < t + 1.0) for i, t in enumerate(arrivals))


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
    assert _most_in_one_second(arrivals) <= rate


async def test_a_ticket_never_marked_done_blocks_only_until_it_is_declared_stuck(monkeypatch):
    from pforte.outbox import ratelimit

    monkeypatch.setattr(ratelimit, "STUCK_AFTER_S", 0.05)
    pacer = Pacer(2, SystemClock(), margin=0.0)
    await pacer.acquire()  # never done: a caller bug
    (await pacer.acquire()).done()
    third = await asyncio.wait_for(pacer.acquire(), 3.0)
    third.done()
