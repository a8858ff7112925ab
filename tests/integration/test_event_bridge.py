"""The live-event bridge between processes (PostgreSQL LISTEN/NOTIFY), two bridges in one test.

test_multiprocess proves that an event reaches a browser on the other process; this proves that
the process that published it delivers it once, not once more when its own notification comes
back from PostgreSQL.
"""

from __future__ import annotations

import asyncio

from pforte.events import EventBus, LiveEvent, PgEventBridge


async def test_each_process_delivers_its_own_events_once_and_the_others_once(pg_url):
    bus_a, bus_b = EventBus(), EventBus()
    bridge_a, bridge_b = PgEventBridge(pg_url, bus_a), PgEventBridge(pg_url, bus_b)
    await bridge_a.start()
    await bridge_b.start()
    first = LiveEvent(org_id="org-1", type="conversation", conversation_id="c-1")
    second = LiveEvent(org_id="org-1", type="conversation", conversation_id="c-2")
    third = LiveEvent(org_id="org-1", type="conversation", conversation_id="c-3")
    try:
        async with bus_a.subscribe("org-1") as seen_a, bus_b.subscribe("org-1") as seen_b:
            bus_a.publish(first)
            assert await asyncio.wait_for(seen_b.get(), 10) == first
            # B publishes only after A's notification reached it, and PostgreSQL delivers
            # notifications in the order they were sent: an echo of `first` would reach A before
            # `second` does.
            bus_b.publish(second)
            assert await asyncio.wait_for(seen_a.get(), 10) == first  # delivered here, at once
            assert await asyncio.wait_for(seen_a.get(), 10) == second  # from B, with no echo before it
            assert await asyncio.wait_for(seen_b.get(), 10) == second
            bus_a.publish(third)  # the same in the other direction: no echo of `second` at B
            assert await asyncio.wait_for(seen_a.get(), 10) == third
            assert await asyncio.wait_for(seen_b.get(), 10) == third
            assert seen_a.empty() and seen_b.empty()
        assert (bridge_a.received, bridge_b.received) == (1, 2)
        assert (bridge_a.dropped, bridge_b.dropped) == (0, 0)
    finally:
        await bridge_a.stop()
        await bridge_b.stop()
