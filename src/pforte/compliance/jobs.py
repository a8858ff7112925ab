"""The scheduled compliance report (DSK IV.4): one saved report per organisation per interval.

Like the retention sweeper, a periodic tick (run once per interval across processes, inside the
periodic claim's transaction) only enqueues a ``compliance_report`` job when none is waiting,
running or finished within the interval. The job then works organisation by organisation: it
builds the report in one read transaction (verifying the audit chain can take a while, and must
not hold SQLite's write lock meanwhile) and saves it in a second, short one. One organisation whose
report fails is logged by error type and skipped; the others still get theirs.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.clock import Clock
from pforte.compliance import service
from pforte.config import Settings
from pforte.db import Database, new_id, table_of
from pforte.orgs import service as orgs
from pforte.outbox.models import Job
from pforte.outbox.worker import ClaimedJob, OutboxWorker, finish

KIND = "compliance_report"
J = table_of(Job)
log = logging.getLogger("pforte.compliance")


async def save_all(
    db: Database, settings: Settings, clock: Clock, *, key_provider: object | None, trigger: str = "schedule"
) -> int:
    """Build and save one report per organisation; returns how many were saved."""
    async with db.transaction() as session:
        org_ids = [o.id for o in await orgs.list_(session=session)]
    saved = 0
    for org_id in org_ids:
        try:
            async with db.transaction() as session:
                report = await service.build(
                    session,
                    org_id=org_id,
                    settings=settings,
                    now=clock.now(),
                    key_provider=key_provider,
                    saving=True,
                )
            async with db.transaction() as session:
                await service.save(session, org_id=org_id, report=report, trigger=trigger)
            saved += 1
        except Exception as exc:  # one organisation's failure must not cost the others their report
            log.warning("compliance report failed", extra={"org_id": org_id, "error": type(exc).__name__})
    return saved


def register(
    worker: OutboxWorker, *, db: Database, clock: Clock, settings: Settings, key_provider: object | None
) -> None:
    """Attach the report job and its periodic tick."""
    interval = settings.compliance_report_seconds

    async def tick(conn: AsyncConnection) -> None:
        now = clock.now()
        recent = await conn.execute(
            select(J.c.id)
            .where(
                J.c.kind == KIND,
                (J.c.state.in_(("queued", "running"))) | (J.c.updated_at > now - timedelta(seconds=interval)),
            )
            .limit(1)
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

    async def run(job: ClaimedJob) -> None:
        await save_all(db, settings, clock, key_provider=key_provider)
        async with db.engine.begin() as conn:
            await finish(conn, job, state="done", now=clock.now())

    worker.register(KIND, run)
    worker.every("compliance_tick", interval, tick)
