"""Periodic work of the staff domain: remove sessions past their time-outs."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.clock import Clock
from pforte.db import table_of
from pforte.outbox.worker import OutboxWorker
from pforte.staff.models import StaffSession

S = table_of(StaffSession)


def register(worker: OutboxWorker, *, clock: Clock, idle: timedelta, every_seconds: float = 300.0) -> None:
    """Purge expired sessions every few minutes."""

    async def purge(conn: AsyncConnection) -> None:
        now = clock.now()
        await conn.execute(delete(S).where((S.c.expires_at <= now) | (S.c.last_seen_at <= now - idle)))

    worker.every("purge_sessions", every_seconds, purge)
