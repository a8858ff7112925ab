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

from pforte.clock import Clock
from pforte.compliance import service
from pforte.config import Settings
from pforte.db import Database
from pforte.orgs import service as orgs
from pforte.outbox.worker import OutboxWorker

KIND = "compliance_report"
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

    async def run() -> None:
        await save_all(db, settings, clock, key_provider=key_provider)

    worker.every_as_job(KIND, "compliance_tick", settings.compliance_report_seconds, run, clock)
