"""Writing and checking the audit log.

Every state-changing action records its entry with :func:`record` on the caller's transaction, so
the entry exists exactly when the change does. Entries carry ids, action names and counts, never
message content, names or phone numbers.

Each organisation has its own chain (instance-wide acts such as backups use ``"instance"``). An
entry's hash covers the previous entry's hash and a canonical JSON encoding of the entry, so a
changed, removed, inserted or reordered row breaks the chain from that point on. Appending first
bumps the chain's head row (``UPDATE … RETURNING``): on PostgreSQL that row lock, on SQLite the
write lock, orders concurrent writers, so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from pforte.audit.models import AuditEvent, AuditHead
from pforte.db import new_id, table_of, upsert_insert

Executor = AsyncSession | AsyncConnection

GENESIS = "0" * 64
INSTANCE = "instance"


@dataclass(frozen=True)
class Actor:
    """Who acted: a staff user, the system (sweeper, jobs) or an operator at the command line."""

    kind: str
    id: str | None = None

    @classmethod
    def staff(cls, user_id: str) -> Actor:
        """A logged-in staff member."""
        return cls("staff", user_id)


SYSTEM = Actor("system")
CLI = Actor("cli")


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's hash covers (fixed key order, UTC ISO time, no whitespace)."""
    at = entry["at"]
    doc = {
        "chain": entry["chain"],
        "seq": entry["seq"],
        "at": at.astimezone(UTC).isoformat(timespec="microseconds") if isinstance(at, datetime) else at,
        "org_id": entry["org_id"],
        "actor_kind": entry["actor_kind"],
        "actor_id": entry["actor_id"],
        "action": entry["action"],
        "object_kind": entry["object_kind"],
        "object_id": entry["object_id"],
        "details": entry["details"],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical entry."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(entry)).hexdigest()


async def _bump_head(db: Executor, chain: str) -> tuple[int, str]:
    """Take the next sequence number of a chain, locking its head until the transaction ends."""
    heads = table_of(AuditHead)
    bump = (
        update(heads)
        .where(heads.c.chain == chain)
        .values(seq=heads.c.seq + 1)
        .returning(heads.c.seq, heads.c.hash)
    )
    row = (await db.execute(bump)).first()
    if row is None:
        dialect = db.dialect.name if isinstance(db, AsyncConnection) else db.get_bind().dialect.name
        ins = upsert_insert(dialect, heads).values(chain=chain, seq=0, hash=GENESIS)
        await db.execute(ins.on_conflict_do_nothing(index_elements=["chain"]))
        row = (await db.execute(bump)).first()
        assert row is not None
    return int(row[0]), str(row[1])


async def record(
    db: Executor,
    *,
    org_id: str | None,
    actor: Actor,
    action: str,
    now: datetime,
    object_kind: str | None = None,
    object_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> str:
    """Append one entry on the caller's transaction; returns its hash."""
    chain = org_id or INSTANCE
    seq, prev = await _bump_head(db, chain)
    entry: dict[str, Any] = {
        "chain": chain,
        "seq": seq,
        "at": now,
        "org_id": org_id,
        "actor_kind": actor.kind,
        "actor_id": actor.id,
        "action": action,
        "object_kind": object_kind,
        "object_id": object_id,
        "details": details,
    }
    digest = chain_hash(prev, entry)
    await db.execute(table_of(AuditEvent).insert().values(id=new_id(), prev_hash=prev, hash=digest, **entry))
    await db.execute(update(table_of(AuditHead)).where(AuditHead.chain == chain).values(hash=digest))
    return digest


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking one chain."""

    chain: str
    entries: int
    ok: bool
    first_bad_seq: int | None = None
    problem: str | None = None


async def _walk(db: Executor, chain: str, batch: int = 5000) -> AsyncIterator[dict[str, Any]]:
    t = table_of(AuditEvent)
    last = 0
    while True:
        rows = (
            await db.execute(
                select(t).where(t.c.chain == chain, t.c.seq > last).order_by(t.c.seq).limit(batch)
            )
        ).mappings()
        got = [dict(r) for r in rows]
        if not got:
            return
        for r in got:
            yield r
        last = got[-1]["seq"]


async def verify(db: Executor, chain: str) -> VerifyResult:
    """Recompute the chain; name the first entry that was changed, removed, inserted or reordered."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    async for row in _walk(db, chain):
        count += 1
        if row["seq"] != expected_seq:
            what = "missing" if row["seq"] > expected_seq else "out of order"
            return VerifyResult(chain, count, False, expected_seq, f"entry {expected_seq} is {what}")
        if row["prev_hash"] != prev:
            return VerifyResult(
                chain, count, False, row["seq"], f"entry {row['seq']} does not follow its predecessor"
            )
        if chain_hash(prev, row) != row["hash"]:
            return VerifyResult(chain, count, False, row["seq"], f"entry {row['seq']} was altered")
        prev = row["hash"]
        expected_seq += 1
    head = (await db.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.chain == chain))).first()
    if head is not None and (head[0] != expected_seq - 1 or head[1] != prev):
        return VerifyResult(
            chain, count, False, expected_seq, f"entries after {expected_seq - 1} are missing"
        )
    return VerifyResult(chain, count, True)


async def list_(
    db: Executor,
    *,
    org_id: str,
    action: str | None = None,
    object_id: str | None = None,
    actor_id: str | None = None,
    limit: int = 200,
    before_seq: int | None = None,
) -> list[AuditEvent]:
    """An organisation's entries, newest first, filtered."""
    q = select(AuditEvent).where(AuditEvent.chain == org_id)
    if action:
        q = q.where(AuditEvent.action == action)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if actor_id:
        q = q.where(AuditEvent.actor_id == actor_id)
    if before_seq:
        q = q.where(AuditEvent.seq < before_seq)
    q = q.order_by(AuditEvent.seq.desc()).limit(limit)
    if isinstance(db, AsyncSession):
        return list((await db.execute(q)).scalars())
    raise TypeError("list_ needs an ORM session")
