"""The sweeper as background work: a periodic tick enqueues one sweep job, a worker runs it.

The tick runs inside the periodic claim's transaction (once per interval across processes) and
only adds a ``retention_sweep`` job if none is waiting or running; the job then opens its own
transaction per batch, which the claim's transaction could not do on SQLite without deadlocking
against itself.
"""

from __future__ import annotations

from pforte.clock import Clock
from pforte.config import Settings
from pforte.db import Database
from pforte.deletion.service import Eraser
from pforte.outbox.worker import OutboxWorker
from pforte.retention import sweeper

KIND = "retention_sweep"


def register(worker: OutboxWorker, *, db: Database, eraser: Eraser, clock: Clock, settings: Settings) -> None:
    """Attach the sweep job and its periodic tick."""

    async def sweep() -> None:
        await sweeper.run(db, eraser, settings, clock.now())  # counts go to the audit log per batch

    worker.every_as_job(KIND, "retention_tick", settings.retention_sweep_seconds, sweep, clock)
