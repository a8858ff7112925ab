"""The sweeper as background work: a periodic tick enqueues one sweep job, a worker runs it.

The tick runs inside the periodic claim's transaction (once per interval across processes) and
only adds a ``retention_sweep`` job if none is waiting or running; the job then opens its own
transaction per batch, which the claim's transaction could not do on SQLite without deadlocking
against itself.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.clock import Clock
from pforte.config import Settings
from pforte.db import Database, new_id, table_of
from pforte.deletion.service import Eraser
from pforte.outbox.models import Job
from pforte.outbox.worker import ClaimedJob, OutboxWorker, finish
from pforte.retention import sweeper

KIND = "retention_sweep"
J = table_of(Job)


def register(worker: OutboxWorker, *, db: Database, eraser: Eraser, clock: Clock, settings: Settings) -> None:
    """Attach the sweep job and its periodic tick."""

    async def tick(conn: AsyncConnection) -> None:
        now = clock.now()
        recent = await conn.execute(
            select(J.c.id).where(
                J.c.kind == KIND,
                (J.c.state.in_(("queued", "running")))
                | (J.c.updated_at > now - timedelta(seconds=settings.retention_sweep_seconds)),
            )
        )
        if recent.first() is not None:  # one waiting, running, or finished within the interval
            return
        await conn.execute(
            insert(J).values(
                id=new_id(),
                org_id=None,
                kind=KIND,
                payload={},
                state="queued",
                attempts=0,
                run_after=now,
                created_at=now,
                updated_at=now,
            )
        )
        worker.wake()

    async def sweep(job: ClaimedJob) -> None:
        await sweeper.run(db, eraser, settings, clock.now())  # counts go to the audit log per batch
        async with db.engine.begin() as conn:
            await finish(conn, job, state="done", now=clock.now())

    worker.register(KIND, sweep)
    worker.every("retention_tick", settings.retention_sweep_seconds, tick)
