"""Live events for connected inbox views (Server-Sent Events), across processes.

Events carry ids only (``{"type": "conversation", "conversation_id": …}``), never content: the
browser fetches the changed fragment through the normal, access-checked routes. Published only
after the transaction that caused them has committed.

With PostgreSQL, ``PgEventBridge`` forwards every event with ``NOTIFY pforte_events`` and LISTENs
for the other processes' events, so a browser connected to any process sees every change. Each
process tags its notifications and ignores its own (it already delivered them locally).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pforte.events")
CHANNEL = "pforte_events"


# Events for the processes themselves, never sent to browsers.
KEY_DESTROYED = "key_destroyed"
ERROR_REPORTING_CHANGED = "error_reporting_changed"  # every process re-reads the setting (reporting/)
SYSTEM_TYPES = frozenset({KEY_DESTROYED, ERROR_REPORTING_CHANGED})


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """Something changed in an organisation's inbox."""

    org_id: str
    type: str  # conversation | channel
    conversation_id: str | None = None
    ref: str | None = None  # for system events: the id they concern (e.g. a destroyed data key)


class EventBus:
    """In-process publish/subscribe keyed by organisation; slow subscribers lose old events."""

    def __init__(self, queue_size: int = 256) -> None:
        self._subs: dict[str, set[asyncio.Queue[LiveEvent]]] = defaultdict(set)
        self._size = queue_size
        self.forward: Callable[[LiveEvent], None] | None = None  # e.g. to other processes
        self.watchers: list[Callable[[LiveEvent], None]] = []  # see every event, system ones included

    def publish(self, event: LiveEvent) -> None:
        """Deliver an event here and forward it to other processes."""
        self.deliver(event)
        if self.forward is not None:
            self.forward(event)

    def deliver(self, event: LiveEvent) -> None:
        """Hand an event to the watchers, then (unless internal) to the organisation's subscribers."""
        for watch in self.watchers:
            watch(event)
        if event.type in SYSTEM_TYPES:
            return
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


class PgEventBridge:
    """Carries live events between processes over PostgreSQL LISTEN/NOTIFY (one connection each).

    asyncpg allows one operation at a time per connection, so notifications go through a queue and a
    single sender task, which sends everything queued in one statement.
    """

    def __init__(self, dsn: str, bus: EventBus) -> None:
        self._dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._bus = bus
        self._origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        # How this process's own notifications begin (``_forward`` puts the origin first), so they are
        # recognised without parsing: with one process every notification comes back to it.
        self._own_prefix = json.dumps({"o": self._origin})[:-1] + ","
        self._conn: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self.received = 0
        self.dropped = 0

    async def start(self) -> None:
        """Connect, listen, and start forwarding this process's events."""
        await self._connect()
        self._bus.forward = self._forward
        self._tasks = [
            asyncio.create_task(self._supervise(), name="pforte-event-bridge"),
            asyncio.create_task(self._sender(), name="pforte-event-sender"),
        ]

    async def stop(self) -> None:
        """Stop forwarding and close the connection."""
        self._bus.forward = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def _connect(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self._dsn)
        await self._conn.add_listener(CHANNEL, self._on_notify)

    async def _supervise(self) -> None:
        """Reconnect if the listening connection drops (events in between are lost, not the data)."""
        while True:
            await asyncio.sleep(1.0)
            if self._conn is None or self._conn.is_closed():
                try:
                    await self._connect()
                except Exception as exc:
                    log.warning("event bridge reconnect failed", extra={"error": type(exc).__name__})

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith(self._own_prefix):
            return
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if data.get("o") == self._origin:
            return
        self.received += 1
        self._bus.deliver(
            LiveEvent(org_id=data["org"], type=data["t"], conversation_id=data.get("c"), ref=data.get("r"))
        )

    def _forward(self, event: LiveEvent) -> None:
        data = {
            "o": self._origin,
            "org": event.org_id,
            "t": event.type,
            "c": event.conversation_id,
            "r": event.ref,
        }
        try:
            self._outbox.put_nowait(json.dumps(data))
        except asyncio.QueueFull:
            self.dropped += 1  # views elsewhere refresh on their next event; nothing stored is lost

    async def _sender(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 500:
                batch.append(self._outbox.get_nowait())
            try:
                if self._conn is not None and not self._conn.is_closed():
                    await self._conn.execute(
                        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, batch
                    )
            except Exception as exc:
                self.dropped += len(batch)
                log.warning("event notify failed", extra={"error": type(exc).__name__})
