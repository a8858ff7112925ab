"""The outbox worker: claims due jobs, runs their handlers, recovers jobs of crashed workers.

Claiming is one statement: ``UPDATE jobs SET state='running', locked_until=… WHERE id IN (SELECT …
FOR UPDATE SKIP LOCKED)`` on PostgreSQL, so several processes never run the same job; on SQLite the
same UPDATE is atomic because SQLite has one writer.

Crash safety (DESIGN 5): a handler that is about to make a non-idempotent network call (sending a
message) first commits ``started_at``. If a worker dies, its lease (``locked_until``) runs out and
``recover_stale`` looks at the job: never started → back to the queue; started but no result → the
message may or may not have gone out, so it is marked for human review, never silently resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.clock import Clock
from pforte.db import Database, table_of
from pforte.metrics import Metrics
from pforte.outbox.models import Job

log = logging.getLogger("pforte.outbox")
J = table_of(Job)


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this worker holds the lease of."""

    id: str
    org_id: str | None
    kind: str
    channel_id: str | None
    payload: dict[str, Any]
    attempts: int
    started_at: datetime | None


Handler = Callable[[ClaimedJob], Awaitable[None]]
StaleHandler = Callable[[AsyncConnection, ClaimedJob, datetime], Awaitable[None]]


def backoff_seconds(attempts: int, retry_after: float | None = None, cap: float = 300.0) -> float:
    """Exponential backoff with jitter, or the provider's own retry hint."""
    if retry_after is not None:
        return retry_after
    base = min(cap, 2.0 ** max(attempts - 1, 0))
    return base * (0.75 + random.random() / 2)


async def finish(
    conn: AsyncConnection,
    job_id: str,
    *,
    state: str,
    now: datetime,
    error: str | None = None,
    retry_in: float | None = None,
    keep_attempt: bool = True,
) -> None:
    """Close a job (done/failed/review) or put it back in the queue after ``retry_in`` seconds."""
    values: dict[str, Any] = {
        "state": state,
        "updated_at": now,
        "locked_by": None,
        "locked_until": None,
        "last_error": error,
    }
    if state == "queued":
        values["run_after"] = now + timedelta(seconds=retry_in or 0.0)
        values["started_at"] = None
        if not keep_attempt:
            values["attempts"] = J.c.attempts - 1
    await conn.execute(update(J).where(J.c.id == job_id).values(**values))


class OutboxWorker:
    """Runs jobs with bounded concurrency until stopped."""

    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        metrics: Metrics,
        poll_seconds: float,
        batch: int,
        lease_seconds: float,
        concurrency: int = 64,
    ) -> None:
        self.db = db
        self.clock = clock
        self.metrics = metrics
        self.poll = poll_seconds
        self.batch = batch
        self.lease = timedelta(seconds=lease_seconds)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"[:64]
        self.handlers: dict[str, Handler] = {}
        self.stale_handlers: dict[str, StaleHandler] = {}
        self._sem = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._periodic: list[list[Any]] = []  # [interval seconds, callable, last run (monotonic)]

    def register(self, kind: str, handler: Handler, on_stale: StaleHandler | None = None) -> None:
        """Attach the handler of a job kind (and what to do if a worker died while running it)."""
        self.handlers[kind] = handler
        if on_stale:
            self.stale_handlers[kind] = on_stale

    def run_soon(self, fn: Callable[[AsyncConnection], Awaitable[Any]]) -> None:
        """Make a periodic task due now and wake the loop."""
        for task in self._periodic:
            if task[1] is fn:
                task[2] = float("-inf")
        self.wake()

    def every(self, seconds: float, fn: Callable[[AsyncConnection], Awaitable[Any]]) -> None:
        """Run ``fn(conn)`` in its own transaction at most every ``seconds`` from the worker loop."""
        self._periodic.append([seconds, fn, float("-inf")])

    async def run_periodic(self, *, force: bool = False) -> None:
        """Run the periodic tasks that are due."""
        for task in self._periodic:
            interval, fn, last = task
            if force or self.clock.monotonic() - last >= interval:
                task[2] = self.clock.monotonic()
                async with self.db.engine.begin() as conn:
                    await fn(conn)

    def wake(self) -> None:
        """Look for new jobs now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        """Start the worker loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="pforte-outbox")

    async def stop(self) -> None:
        """Stop claiming and wait for running jobs."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                n = await self.run_once(wait=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox loop error", extra={"error": type(exc).__name__})
                n = 0
            if n == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    async def run_once(self, *, wait: bool = True) -> int:
        """Recover stale jobs, claim due ones and start them; with ``wait`` also await them."""
        await self.recover_stale()
        await self.run_periodic(force=wait)
        free = max(self._sem._value, 0)
        if free == 0:
            await asyncio.sleep(0.01)
            return 0
        jobs = await self.claim(min(free, self.batch))
        tasks = [asyncio.create_task(self._run(j)) for j in jobs]
        for t in tasks:
            self._running.add(t)
            t.add_done_callback(self._running.discard)
        if wait and tasks:
            await asyncio.gather(*tasks)
        return len(jobs)

    async def drain(self, max_rounds: int = 100) -> None:
        """Run until no job is due (tests and the CLI)."""
        for _ in range(max_rounds):
            if await self.run_once(wait=True) == 0 and not self._running:
                return

    async def claim(self, limit: int) -> list[ClaimedJob]:
        """Take up to ``limit`` due jobs."""
        now = self.clock.now()
        sub = (
            select(J.c.id)
            .where(J.c.state == "queued", J.c.run_after <= now)
            .order_by(J.c.run_after)
            .limit(limit)
        )
        async with self.db.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                sub = sub.with_for_update(skip_locked=True)
            rows = await conn.execute(
                update(J)
                .where(J.c.id.in_(sub))
                .values(
                    state="running",
                    locked_by=self.worker_id,
                    locked_until=now + self.lease,
                    attempts=J.c.attempts + 1,
                    updated_at=now,
                )
                .returning(
                    J.c.id, J.c.org_id, J.c.kind, J.c.channel_id, J.c.payload, J.c.attempts, J.c.started_at
                )
            )
            return [ClaimedJob(**r._mapping) for r in rows]

    async def recover_stale(self) -> int:
        """Handle jobs whose worker's lease ran out (the worker crashed or hung)."""
        now = self.clock.now()
        async with self.db.engine.begin() as conn:
            q = (
                select(
                    J.c.id, J.c.org_id, J.c.kind, J.c.channel_id, J.c.payload, J.c.attempts, J.c.started_at
                )
                .where(J.c.state == "running", J.c.locked_until < now)
                .limit(100)
            )
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            stale = [ClaimedJob(**r._mapping) for r in await conn.execute(q)]
            for job in stale:
                handler = self.stale_handlers.get(job.kind)
                if job.started_at is not None and handler is not None:
                    await handler(conn, job, now)
                else:
                    await finish(conn, job.id, state="queued", now=now, error="lease expired")
        return len(stale)

    async def _run(self, job: ClaimedJob) -> None:
        async with self._sem:
            handler = self.handlers.get(job.kind)
            try:
                if handler is None:
                    raise LookupError(job.kind)
                await handler(job)
                self.metrics.outbox_jobs.labels(job.kind, "ran").inc()
            except Exception as exc:
                # A bug or an unreachable database: leave the job to lease expiry and recovery.
                self.metrics.outbox_jobs.labels(job.kind, "crashed").inc()
                log.warning("job handler error", extra={"kind": job.kind, "error": type(exc).__name__})
