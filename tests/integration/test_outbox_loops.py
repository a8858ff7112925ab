"""The outbox's two loops: claims do not wait for periodic tasks, and periodic work is prompt.

The claim loop and the periodic loop run as separate tasks. These tests start a worker whose claim
loop polls only every 30 s, so anything that happens sooner happened because one loop woke the
other at the right moment.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from pforte.clock import SystemClock
from pforte.db import Database
from pforte.metrics import Metrics
from pforte.outbox import worker as worker_mod
from pforte.outbox.models import Job
from pforte.outbox.worker import OutboxWorker

SOON_S = 5.0  # far below the 30-s poll: the event came from a wake, not from polling


def _worker(db: Database) -> OutboxWorker:
    return OutboxWorker(
        db=db, clock=SystemClock(), metrics=Metrics(), poll_seconds=30.0, batch=50, lease_seconds=60.0
    )


async def test_a_job_queued_by_a_periodic_tick_runs_once_the_tick_has_committed(db_url):
    db = Database(db_url)
    worker = _worker(db)
    ran = asyncio.Event()

    async def run() -> None:
        ran.set()

    worker.every_as_job("loop_test", "loop_test_tick", 3600.0, run, SystemClock())
    await worker.start()
    try:
        await asyncio.wait_for(ran.wait(), SOON_S)
    finally:
        await worker.stop()
        async with db.engine.connect() as conn:
            states = (await conn.execute(select(Job.state).where(Job.kind == "loop_test"))).scalars().all()
        await db.dispose()
    assert states == ["done"]


async def test_run_soon_runs_a_periodic_task_again_without_waiting_for_its_interval(db_url, monkeypatch):
    monkeypatch.setattr(worker_mod, "PERIODIC_CHECK_S", 30.0)  # only a wake can make it prompt
    db = Database(db_url)
    worker = _worker(db)
    runs: list[int] = []
    second = asyncio.Event()

    async def task(conn) -> None:
        runs.append(1)
        if len(runs) == 2:
            second.set()

    worker.every("loop_test_task", 3600.0, task)
    await worker.start()
    try:
        for _ in range(100):  # the first run happens at start (the task has never run)
            if runs:
                break
            await asyncio.sleep(0.05)
        assert runs == [1]
        worker.run_soon(task)
        await asyncio.wait_for(second.wait(), SOON_S)
    finally:
        await worker.stop()
        await db.dispose()
    assert runs == [1, 1]
