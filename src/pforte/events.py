"""Live events for connected inbox views (Server-Sent Events).

Events carry ids only (``{"type": "conversation", "conversation_id": …}``), never content: the
browser fetches the changed fragment through the normal, access-checked routes. Published only
after the transaction that caused them has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """Something changed in an organisation's inbox."""

    org_id: str
    type: str  # conversation | channel
    conversation_id: str | None = None


class EventBus:
    """In-process publish/subscribe keyed by organisation; slow subscribers lose old events."""

    def __init__(self, queue_size: int = 256) -> None:
        self._subs: dict[str, set[asyncio.Queue[LiveEvent]]] = defaultdict(set)
        self._size = queue_size

    def publish(self, event: LiveEvent) -> None:
        """Hand an event to every subscriber of its organisation."""
        for q in list(self._subs.get(event.org_id, ())):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self, org_id: str) -> AsyncIterator[asyncio.Queue[LiveEvent]]:
        """A queue receiving the organisation's events while the context is open."""
        q: asyncio.Queue[LiveEvent] = asyncio.Queue(self._size)
        self._subs[org_id].add(q)
        try:
            yield q
        finally:
            self._subs[org_id].discard(q)
