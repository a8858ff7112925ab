"""Periodic work of the staff domain: remove sessions past their time-outs."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.audit import service as audit
from pforte.audit.service import SYSTEM
from pforte.clock import Clock
from pforte.db import table_of
from pforte.outbox.worker import OutboxWorker
from pforte.staff.models import StaffSession

S = table_of(StaffSession)


def register(worker: OutboxWorker, *, clock: Clock, idle: timedelta, every_seconds: float = 300.0) -> None:
    """Purge expired sessions every few minutes."""

    async def purge(conn: AsyncConnection) -> None:
        now = clock.now()
        gone = (
            await conn.execute(
                delete(S)
                .where((S.c.expires_at <= now) | (S.c.last_seen_at <= now - idle))
                .returning(S.c.org_id, S.c.user_id, S.c.expires_at)
            )
        ).all()
        # One entry per ended session, in the purge's transaction; sorted, so that chain heads are
        # always locked in the same order by concurrent writers.
        for org_id, user_id, expires_at in sorted(gone, key=lambda r: (r[0], r[1])):
            await audit.record(
                conn,
                org_id=org_id,
                actor=SYSTEM,
                action="session.end",
                now=now,
                object_kind="staff_user",
                object_id=user_id,
                details={"reason": "absolute" if expires_at <= now else "idle"},
            )

    worker.every("purge_sessions", every_seconds, purge)
