"""Periodic work of the audit domain: sign every organisation's chain head (see checkpoints.py)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.audit import checkpoints
from pforte.clock import Clock
from pforte.crypto.keys import KeyService
from pforte.db import table_of
from pforte.errors import PforteError
from pforte.orgs.models import Organisation
from pforte.outbox.worker import OutboxWorker

log = logging.getLogger("pforte.audit")
ORG = table_of(Organisation)


def register(worker: OutboxWorker, *, keys: KeyService, clock: Clock, every_seconds: float = 3600.0) -> None:
    """Checkpoint each organisation's chain once an interval (across all processes)."""

    async def sign_heads(conn: AsyncConnection) -> None:
        now = clock.now()
        for org_id in (await conn.execute(select(ORG.c.id).order_by(ORG.c.id))).scalars().all():
            try:
                await checkpoints.checkpoint(conn, keys, org_id=org_id, now=now)
            except PforteError as exc:  # e.g. its KEK is missing: the other organisations still get theirs
                log.warning("audit checkpoint failed", extra={"org_id": org_id, "error": exc.code})

    worker.every("audit_checkpoints", every_seconds, sign_heads)
