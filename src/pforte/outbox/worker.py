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
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.clock import Clock
from pforte.db import Database, new_id, table_of, upsert_insert
from pforte.metrics import Metrics
from pforte.outbox.models import Job, PeriodicRun

log = logging.getLogger("pforte.outbox")
J = table_of(Job)
PR = table_of(PeriodicRun)


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
    locked_by: str | None = None  # the worker holding the lease; every write by the runner checks it


@dataclass(slots=True)
class PeriodicTask:
    """A task the worker loop runs every ``interval`` seconds (once across processes)."""

    name: str
    interval: float
    fn: Callable[[AsyncConnection], Awaitable[Any]]
    checked: float = float("-inf")
    forced: bool = False


NEVER = datetime(2000, 1, 1, tzinfo=UTC)
RECOVER_EVERY_S = 1.0  # the loop looks for expired leases this often (a lease lasts a minute)
PERIODIC_CHECK_S = 0.25  # how often the periodic loop looks for due tasks (each looks at most once a second)
Handler = Callable[[ClaimedJob], Awaitable[None]]
BatchHandler = Callable[[list[ClaimedJob]], Awaitable[None]]
StaleHandler = Callable[[AsyncConnection, ClaimedJob, datetime], Awaitable[None]]


def backoff_seconds(attempts: int, retry_after: float | None = None, cap: float = 300.0) -> float:
    """Exponential backoff with jitter, or the provider's own retry hint."""
    if retry_after is not None:
        return retry_after
    base = min(cap, 2.0 ** max(attempts - 1, 0))
    return base * (0.75 + random.random() / 2)


def held(job: ClaimedJob) -> Any:
    """SQL condition: the job is still running under this claim (its lease was not taken over)."""
    return (J.c.id == job.id) & (J.c.state == "running") & (J.c.locked_by == job.locked_by)


async def mark_started(conn: AsyncConnection, job: ClaimedJob, now: datetime) -> bool:
    """Record that a non-idempotent call is about to start; False if the lease was lost (do not call)."""
    result = await conn.execute(update(J).where(held(job)).values(started_at=now))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def mark_started_many(conn: AsyncConnection, jobs: list[ClaimedJob], now: datetime) -> set[str]:
    """``mark_started`` for many jobs at once; the ids of those this worker still holds."""
    held_ids: set[str] = set()
    for locked_by, ids in _by_claim(jobs).items():
        rows = await conn.execute(
            update(J)
            .where(J.c.id.in_(ids), J.c.state == "running", J.c.locked_by == locked_by)
            .values(started_at=now)
            .returning(J.c.id)
        )
        held_ids.update(r.id for r in rows)
    return held_ids


def _by_claim(jobs: list[ClaimedJob]) -> dict[str | None, list[str]]:
    """Job ids grouped by the claim holding them (one UPDATE per claim, usually one)."""
    out: dict[str | None, list[str]] = {}
    for job in jobs:
        out.setdefault(job.locked_by, []).append(job.id)
    return out


async def finish(
    conn: AsyncConnection,
    job: ClaimedJob,
    *,
    state: str,
    now: datetime,
    error: str | None = None,
    retry_in: float | None = None,
    keep_attempt: bool = True,
) -> None:
    """Close a job (done/failed/review) or put it back in the queue after ``retry_in`` seconds.

    Only while this claim still holds the job: a runner whose lease was recovered changes nothing.
    """
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
    await conn.execute(update(J).where(held(job)).values(**values))


async def finish_many(conn: AsyncConnection, jobs: list[ClaimedJob], *, state: str, now: datetime) -> None:
    """Close many jobs as ``state`` (done/failed/review) in one statement per claim."""
    values = {"state": state, "updated_at": now, "locked_by": None, "locked_until": None, "last_error": None}
    for locked_by, ids in _by_claim(jobs).items():
        await conn.execute(
            update(J)
            .where(J.c.id.in_(ids), J.c.state == "running", J.c.locked_by == locked_by)
            .values(**values)
        )


class OutboxWorker:
    """Runs jobs with bounded concurrency until stopped.

    A kind registered with ``register_batch`` gets all jobs of one claim that share a channel in
    one call (the send path: one transaction for many messages); each job still counts against
    ``concurrency``.
    """

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
        self.worker_id = f"{socket.gethostname()[:30]}:{os.getpid()}:{id(self):x}"
        self.handlers: dict[str, Handler] = {}
        self.stale_handlers: dict[str, StaleHandler] = {}
        self.batch_handlers: dict[str, BatchHandler] = {}
        self.concurrency = concurrency
        self._in_flight = 0  # claimed jobs not yet finished by their handler
        self._wake = asyncio.Event()
        self._periodic_wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._periodic_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._periodic: list[PeriodicTask] = []
        self._known_periodic: set[str] = set()
        self._starved = False

    def register(self, kind: str, handler: Handler, on_stale: StaleHandler | None = None) -> None:
        """Attach the handler of a job kind (and what to do if a worker died while running it)."""
        self.handlers[kind] = handler
        if on_stale:
            self.stale_handlers[kind] = on_stale

    def register_batch(self, kind: str, handler: BatchHandler, on_stale: StaleHandler | None = None) -> None:
        """Attach a handler that takes the claimed jobs of ``kind`` for one channel together."""
        self.batch_handlers[kind] = handler
        if on_stale:
            self.stale_handlers[kind] = on_stale

    def run_soon(self, fn: Callable[[AsyncConnection], Awaitable[Any]]) -> None:
        """Run a periodic task in this process at the next loop turn (for idempotent tasks), and wake it."""
        for task in self._periodic:
            if task.fn is fn:
                task.forced = True
        self._periodic_wake.set()

    def every(self, name: str, seconds: float, fn: Callable[[AsyncConnection], Awaitable[Any]]) -> None:
        """Run ``fn(conn)`` once every ``seconds`` across all processes sharing the database."""
        self._periodic.append(PeriodicTask(name=name, interval=seconds, fn=fn))

    def every_as_job(
        self, kind: str, tick_name: str, seconds: float, run: Callable[[], Awaitable[Any]], clock: Clock
    ) -> None:
        """Run ``run()`` as a job of ``kind`` about once every ``seconds`` across all processes.

        A periodic tick queues one job unless one is queued, running, or finished within the
        interval; a worker runs it like any job (leased, retried if its process dies), so a long run
        does not hold the tick's transaction.
        """

        async def tick(conn: AsyncConnection) -> None:
            now = clock.now()
            recent = await conn.execute(
                select(J.c.id)
                .where(
                    J.c.kind == kind,
                    (J.c.state.in_(("queued", "running")))
                    | (J.c.updated_at > now - timedelta(seconds=seconds)),
                )
                .limit(1)
            )
            if recent.first() is not None:
                return
            await conn.execute(
                J.insert().values(
                    id=new_id(),
                    org_id=None,
                    kind=kind,
                    payload={},
                    state="queued",
                    attempts=0,
                    run_after=now,
                    created_at=now,
                    updated_at=now,
                )
            )

        async def handler(job: ClaimedJob) -> None:
            await run()
            async with self.db.engine.begin() as conn:
                await finish(conn, job, state="done", now=clock.now())

        self.register(kind, handler)
        self.every(tick_name, seconds, tick)

    async def run_periodic(self, *, force: bool = False) -> None:
        """Run the periodic tasks that are due; each run is claimed in ``periodic_runs`` first.

        The claim is an UPDATE that only succeeds if the last run is at least one interval old, in the
        same transaction as the task: on PostgreSQL a second process waits on the row lock and then
        finds the claim taken, so a task runs once per interval however many processes there are.
        """
        mono = self.clock.monotonic()
        for task in self._periodic:
            forced = force or task.forced
            if not forced and mono - task.checked < min(task.interval, 1.0):
                continue  # look at the claim row at most once a second per task
            task.checked, task.forced = mono, False
            async with self.db.engine.begin() as conn:
                ran = forced or await self._claim(conn, task)
                if ran:
                    await task.fn(conn)
            if ran:
                self.wake()  # committed now: a job the task queued can be claimed at once

    async def _claim(self, conn: AsyncConnection, task: PeriodicTask) -> bool:
        now = self.clock.now()
        if task.name not in self._known_periodic:
            await conn.execute(
                upsert_insert(conn.dialect.name, PR).on_conflict_do_nothing(index_elements=["name"]),
                [{"name": task.name, "last_run_at": NEVER, "runs": 0}],
            )
            self._known_periodic.add(task.name)
        result = await conn.execute(
            update(PR)
            .where(PR.c.name == task.name, PR.c.last_run_at <= now - timedelta(seconds=task.interval))
            .values(last_run_at=now, runs=PR.c.runs + 1)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def wake(self) -> None:
        """Look for new jobs now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        """Start the worker loop and the periodic tasks' loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="pforte-outbox")
        if self._periodic_task is None:
            self._periodic_task = asyncio.create_task(self._periodic_loop(), name="pforte-periodic")

    async def stop(self) -> None:
        """Stop claiming and wait for running jobs."""
        for task in (self._task, self._periodic_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._periodic_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _loop(self) -> None:
        """Claim and start jobs while there are free places; look for expired leases once a second.

        Periodic tasks run in their own loop: a reconcile or a sweep that takes a few hundred
        milliseconds must not hold up the next claim of sends.
        """
        renewed = self.clock.monotonic()
        recovered = float("-inf")
        while True:
            try:
                if self._running and self.clock.monotonic() - renewed > self.lease.total_seconds() / 3:
                    await self.renew_leases()
                    renewed = self.clock.monotonic()
                self._wake.clear()  # a wake during the turn below is kept for the wait after it
                if self.clock.monotonic() - recovered >= RECOVER_EVERY_S:
                    await self.recover_stale()
                    recovered = self.clock.monotonic()
                n = await self._claim_and_start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox loop error", extra={"error": type(exc).__name__})
                n = 0
            if n == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    async def _periodic_loop(self) -> None:
        """Run the periodic tasks as they fall due (each claimed once across processes)."""
        while True:
            self._periodic_wake.clear()  # a run_soon during the run below is kept for the wait after it
            try:
                await self.run_periodic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("periodic task error", extra={"error": type(exc).__name__})
            # Real time (a fake clock moves only when a test says); run_soon cuts the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._periodic_wake.wait(), PERIODIC_CHECK_S)

    async def run_once(self, *, wait: bool = True) -> int:
        """Recover stale jobs, run due periodic tasks, claim due jobs and start them; with ``wait``
        also await them (and force the periodic tasks)."""
        await self.recover_stale()
        await self.run_periodic(force=wait)
        return await self._claim_and_start(wait=wait)

    async def _claim_and_start(self, *, wait: bool = False) -> int:
        """Claim as many due jobs as there are free places (up to ``batch``) and start them."""
        free = max(self.concurrency - self._in_flight, 0)
        if free == 0:
            self._starved = True  # the next job to finish wakes the loop
            return 0
        jobs = await self.claim(min(free, self.batch))
        self._in_flight += len(jobs)
        tasks = [asyncio.create_task(self._run(j)) for j in jobs if j.kind not in self.batch_handlers]
        groups: dict[tuple[str, str | None], list[ClaimedJob]] = {}
        for j in jobs:
            if j.kind in self.batch_handlers:
                groups.setdefault((j.kind, j.channel_id), []).append(j)
        tasks += [asyncio.create_task(self._run_batch(kind, group)) for (kind, _), group in groups.items()]
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
                    locked_by=f"{self.worker_id}/{secrets.token_hex(4)}",  # unique per claim
                    locked_until=now + self.lease,
                    attempts=J.c.attempts + 1,
                    updated_at=now,
                )
                .returning(
                    J.c.id,
                    J.c.org_id,
                    J.c.kind,
                    J.c.channel_id,
                    J.c.payload,
                    J.c.attempts,
                    J.c.started_at,
                    J.c.locked_by,
                )
            )
            return [ClaimedJob(**r._mapping) for r in rows]

    async def renew_leases(self) -> None:
        """Extend the leases of the jobs this worker is still running (a slow send is not a dead one)."""
        now = self.clock.now()
        async with self.db.engine.begin() as conn:
            await conn.execute(
                update(J)
                .where(
                    J.c.locked_by.startswith(self.worker_id + "/", autoescape=True), J.c.state == "running"
                )
                .values(locked_until=now + self.lease)
            )

    async def recover_stale(self) -> int:
        """Handle jobs whose worker's lease ran out (the worker crashed or hung)."""
        now = self.clock.now()
        async with self.db.engine.begin() as conn:
            q = (
                select(
                    J.c.id,
                    J.c.org_id,
                    J.c.kind,
                    J.c.channel_id,
                    J.c.payload,
                    J.c.attempts,
                    J.c.started_at,
                    J.c.locked_by,
                )
                .where(J.c.state == "running", J.c.locked_until < now)
                .limit(100)
            )
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            stale = [ClaimedJob(**r._mapping) for r in await conn.execute(q)]
            for job in stale:
                handler = self.stale_handlers.get(job.kind)
                to_review = job.started_at is not None and handler is not None
                # One conditional UPDATE decides: atomic on SQLite too, where the SELECT above runs
                # outside the write transaction and another process may have recovered the job meanwhile.
                values: dict[str, Any] = {"locked_by": None, "locked_until": None, "updated_at": now}
                if to_review:
                    values.update(state="review", last_error="worker stopped during the call")
                else:
                    values.update(state="queued", run_after=now, started_at=None, last_error="lease expired")
                taken = await conn.execute(
                    update(J)
                    .where(J.c.id == job.id, J.c.state == "running", J.c.locked_until < now)
                    .values(**values)
                )
                if taken.rowcount == 1 and to_review and handler is not None:  # type: ignore[attr-defined]
                    await handler(conn, job, now)
        return len(stale)

    async def _run_batch(self, kind: str, jobs: list[ClaimedJob]) -> None:
        try:
            await self.batch_handlers[kind](jobs)
            self.metrics.outbox_jobs.labels(kind, "ran").inc(len(jobs))
        except Exception as exc:
            # As for single jobs: what did not finish is left to lease expiry and recovery.
            self.metrics.outbox_jobs.labels(kind, "crashed").inc(len(jobs))
            log.warning("job handler error", extra={"kind": kind, "error": type(exc).__name__})
        finally:
            self._freed(len(jobs))

    def _freed(self, n: int) -> None:
        """Jobs finished: if the loop found no free place last time, let it claim again now."""
        self._in_flight -= n
        if self._starved:
            self._starved = False
            self.wake()

    async def _run(self, job: ClaimedJob) -> None:
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
        finally:
            self._freed(1)
