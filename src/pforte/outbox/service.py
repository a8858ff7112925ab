"""Enqueue jobs in the caller's transaction (the job commits with the change that needs it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pforte.outbox.models import Job


async def enqueue(
    *,
    session: AsyncSession,
    org_id: str | None,
    kind: str,
    payload: dict[str, Any],
    now: datetime,
    channel_id: str | None = None,
    run_after: datetime | None = None,
) -> Job:
    """Add a job; it becomes visible to workers when the caller commits."""
    job = Job(
        org_id=org_id,
        kind=kind,
        channel_id=channel_id,
        payload=payload,
        state="queued",
        attempts=0,
        run_after=run_after or now,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    await session.flush()
    return job
